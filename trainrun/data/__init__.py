"""Datasets (train / val / a held-out test split) and deterministic, resumable batching."""
from trainrun.data.datasets import (LOADERS, FileSet, Split, TensorSet, build_split, check_tensor_data, sample_inputs,
                                    split_indices)
from trainrun.data.loader import BatchStream

__all__ = ["LOADERS", "FileSet", "Split", "TensorSet", "build_split", "check_tensor_data", "sample_inputs",
           "split_indices", "BatchStream"]
