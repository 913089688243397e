"""Exception types raised by encodenet_timm.

Bad user input raises the built-in ``ValueError`` / ``TypeError``; these classes are for the
cases the built-ins do not describe: a model we cannot handle, a training stage that diverged, training
data that cannot be read, a run directory another process writes, a run stopped by a signal, and a
process group that lost a rank.
"""
import signal as _signal
from typing import Optional

__all__ = ["EncodeNetError", "UnsupportedModelError", "NonFiniteLossError", "RunDirInUseError", "DataError",
           "Interrupted", "RankLostError"]


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


class Interrupted(EncodeNetError):
    """SIGTERM or SIGINT stopped `fit(run_dir=...)`; where a training step was under way, it was finished
    and a checkpoint written first. ``fit(..., resume=True)`` continues from the last checkpoint.

    Attributes:
        signal: the signal number (``signal.SIGTERM``, ``signal.SIGINT``); the CLI exits with 128 + it.
        stage, epoch, step: where the stage stopped (epochs complete, batches of the next one), when known.
    """

    def __init__(self, signal: int, stage: Optional[str] = None, epoch: Optional[int] = None,
                 step: Optional[int] = None):
        self.signal, self.stage, self.epoch, self.step = signal, stage, epoch, step
        where = f" in {stage}" if stage else ""
        if stage and epoch is not None:  # epoch: epochs complete; step: batches of the next one
            where += (f" after step {step} of epoch {epoch + 1}" if step else f" after epoch {epoch}") + \
                " (checkpoint written)"
        super().__init__(f"stopped by {_signal.Signals(signal).name}{where}")

    def __reduce__(self):  # picklable with its fields (multiprocessing, DataLoader workers)
        return type(self), (self.signal, self.stage, self.epoch, self.step)


class RankLostError(EncodeNetError, RuntimeError):
    """Under torch.distributed, a collective failed: another rank died or stopped answering within the
    process group's timeout. The run directory keeps its last complete checkpoint."""
