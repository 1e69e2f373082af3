"""Disease progression regression on scikit-learn's diabetes data, trained by trainrun through `_target_`.

regression_example.data.diabetes_splits builds the datasets and regression_example.model.DiabetesMLP the
network; configs/ selects them (see README.md).
"""
