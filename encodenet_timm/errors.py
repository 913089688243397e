"""Exception types raised by encodenet_timm.

Bad user input raises the built-in ``ValueError`` / ``TypeError``; these classes are for the
cases the built-ins do not describe: a model we cannot handle, a training stage that diverged, and
training data that cannot be read.
"""
from typing import Optional

__all__ = ["EncodeNetError", "UnsupportedModelError", "NonFiniteLossError", "RunDirInUseError", "DataError"]


class EncodeNetError(Exception):
    """Base class of every error specific to encodenet_timm."""


class UnsupportedModelError(EncodeNetError, TypeError):
    """The model is a timm-style classifier, but one part of the method cannot handle it.

    The message names the model class and the reason (e.g. the encoder output layout).
    """


class NonFiniteLossError(EncodeNetError, FloatingPointError):
    """A training stage produced a NaN or infinite loss.

    Attributes:
        stage: name of the stage (``"baseline"``, ``"autoencoder"``, ``"transfer"``).
        epoch: 0-based epoch in which it happened.
        step: 0-based step within the epoch.
    """

    def __init__(self, stage: str, epoch: int, step: int, value: float):
        self.stage, self.epoch, self.step, self.value = stage, epoch, step, value
        super().__init__(
            f"{stage} stage: loss became {value} at epoch {epoch}, step {step}. "
            f"Lower the {stage} learning rate (config.{stage}.lr), set config.{stage}.clip_grad, "
            f"or check the inputs for NaN/inf values."
        )


class RunDirInUseError(EncodeNetError, RuntimeError):
    """Another process is writing the run (or comparison) directory: two writers would mix their files.

    The message names the directory and the process holding its lock.
    """


class DataError(EncodeNetError, ValueError):
    """Training data that cannot be used: an unreadable, corrupt or truncated image file, or a dataset
    that changed under a resumed run. The message names the file (and dataset index) or what changed.

    Attributes:
        path: the file, when one is to blame.
        index: its index in the dataset, when known.
    """

    def __init__(self, message: str, *, path: Optional[str] = None, index: Optional[int] = None):
        # a DataLoader worker's error comes back as DataError("Caught DataError in DataLoader worker ...
        # Original Traceback ... DataError: <message>"): keep the message, not the worker's traceback
        if "Original Traceback" in message and "DataError: " in message:
            message = message.rsplit("DataError: ", 1)[-1].strip()
        super().__init__(message)
        self.path, self.index = path, index
