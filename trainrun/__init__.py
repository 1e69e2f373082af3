"""trainrun: config-driven, exactly reproducible PyTorch training."""
__version__ = "0.1.0"


def __getattr__(name: str):
    # `trainrun.load` imports torch and the model zoo only when first used: `import trainrun` stays cheap
    if name == "load":
        from trainrun.inference import load

        return load
    raise AttributeError(f"module 'trainrun' has no attribute {name!r}")


__all__ = ["load", "__version__"]
