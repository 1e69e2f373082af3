"""trainrun: config-driven, exactly reproducible PyTorch training."""
__version__ = "0.1.0"
