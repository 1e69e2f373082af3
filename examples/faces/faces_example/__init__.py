"""Face / non-face classification on scikit-image's LFW subset, trained by trainrun through `_target_`.

faces_example.data.lfw_splits builds the datasets, faces_example.model.FaceNet the network and
faces_example.callbacks.TrainingTally a stateful callback; configs/ selects them (see README.md).
"""
