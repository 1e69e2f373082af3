"""Datasets and deterministic, resumable batching."""
from trainrun.data.datasets import LOADERS, FileSet, Split, TensorSet, build_split, check_tensor_data, sample_inputs
from trainrun.data.loader import BatchStream

__all__ = ["LOADERS", "FileSet", "Split", "TensorSet", "build_split", "check_tensor_data", "sample_inputs", "BatchStream"]
