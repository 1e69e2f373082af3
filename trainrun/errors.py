"""Errors that end a run with one clear line (`trainrun: error: ...`) instead of a traceback."""


class TrainrunError(Exception):
    """A user-facing problem: bad config, bad checkpoint, bad data. The message names the fix."""


class ConfigError(TrainrunError):
    pass


class CheckpointError(TrainrunError):
    pass


class DataError(TrainrunError):
    pass
