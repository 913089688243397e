"""The lifecycle of one `fit(run_dir=...)` (`Run`): begin or resume the run directory, hand each stage
its resume state and stop requests, checkpoint, record skipped, failed and interrupted stages, finish.
"""
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from . import distributed
from .checkpoint import Checkpoint
from .checks import data_fingerprint
from .env import machine, precision, versions
from .errors import Interrupted, RankLostError
from .files import load_state_into
from .representatives import Representatives
from .run_dir import SUMMARY_FILE, RunDir, model_fingerprint, write_summary
from .stopping import StopSignals
from .training import TrainState

__all__ = ["Run", "run_facts", "Parts", "load_parts"]

_logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


class Run:
    """One `fit(run_dir=...)`, from begin to finish: what the wrapper calls at each point of its stages.

    Rank 0 writes (config, run.json, the checkpoints, the final model); every rank reads the checkpoint
    to resume from. ``Run()`` stands for a fit without a run directory: every call does nothing, and
    signals keep their usual effect.

    Attributes:
        dir: the `RunDir`, or None.
        writes: this process writes the run directory (rank 0 of a run with one).
        done: the stages a resumed run completed before; fit passes over them.
        stop: with a run directory, the `StopSignals` (SIGTERM/SIGINT) while `run_stages` runs, which a
            training loop polls (``train_stage(stop=...)``); None without one.
    """

    def __init__(self, run_dir: Optional[RunDir] = None, *, writes: bool = False):
        self.dir = run_dir
        self.writes = writes and run_dir is not None
        self.done: Tuple[str, ...] = ()
        self.stop: Optional[StopSignals] = StopSignals() if run_dir is not None else None
        self._resume: Dict[str, TrainState] = {}  # stage -> loop state to continue it from

    @classmethod
    def begin(cls, path: Optional[PathLike], stages: Sequence[str], config: Dict[str, Any],
              info: Callable[[], Dict[str, Any]], *, resume: bool) -> "Run":
        """Start (or, with `resume`, reopen) the run in `path` (`RunDir.begin`); every rank calls it.

        Args:
            path: the run directory; None gives ``Run()``.
            stages: the stage names in the order they run.
            config: the full config as a plain dict.
            info: returns the run facts for run.json (called on rank 0 only).
        """
        if path is None:
            return cls()
        run_dir = RunDir(path, stages)
        if distributed.is_main():
            run_dir.begin(config, info(), resume)
        distributed.barrier()
        return cls(run_dir, writes=distributed.is_main())

    def close(self) -> None:
        """Release the run directory's lock (every rank calls it; fit does, however it ends)."""
        if self.writes:
            self.dir.close()

    def latest(self) -> Checkpoint:
        """The checkpoint to resume from: the latest complete one of the last stage that has one.

        Raises:
            ValueError: the run has no complete checkpoint, or a file of the latest differs from its manifest
                (the message names the file and the folder to delete to continue from the one before).
        """
        ckpt = self.dir.latest()
        if ckpt is None:
            raise ValueError(f"{self.dir.path} holds no complete checkpoint to resume from; run without resume "
                             f"to start it again")
        try:
            ckpt.verify()  # every file, before any is loaded
        except ValueError as e:
            raise self.dir.damaged(ckpt, e) from e
        return ckpt

    def continue_from(self, ckpt: Checkpoint) -> None:
        """Resume after `ckpt` (already loaded by the caller): its stage's loop state, if the stage is
        unfinished, goes to `resume_state`, and the stages it completed to `done`."""
        if not ckpt.stage_complete:
            self._resume[ckpt.stage] = ckpt.train_state()
        _logger.info("resuming %s from %s epoch %d/%d + %d steps", self.dir.path, ckpt.stage, ckpt.epoch, ckpt.epochs,
                     ckpt.step)
        self.done = self.dir.stages[:self.dir.stages.index(ckpt.stage) + ckpt.stage_complete]

    def resumes(self, stage: str) -> bool:
        """`stage` continues from a checkpoint taken in its middle."""
        return stage in self._resume

    def resume_state(self, stage: str) -> Optional[TrainState]:
        """The loop state `stage` continues from (once; None when it starts afresh)."""
        return self._resume.pop(stage, None)

    def save(self, stage: str, epoch: int, epochs: int, **files: Any) -> None:
        """`RunDir.save` on the writing rank, then summary.csv from the history in ``files["state"]``;
        nothing elsewhere."""
        if self.writes:
            with self.deferred():  # a signal while the files are written takes effect after them
                self.dir.save(stage, epoch, epochs, **files)
                history = (files.get("state") or {}).get("history")
                if history:
                    write_summary(self.dir.path / SUMMARY_FILE, history)

    def save_parts(self, stage: str, epoch: int, epochs: int, *, model: nn.Module, decoder: Optional[nn.Module],
                   tail: Optional[Dict[str, torch.Tensor]], representatives: Optional[Any], history: Dict[str, Any],
                   input_size: Tuple[int, int, int], decoder_trained: bool, train: Optional[TrainState] = None) -> None:
        """`save` of a wrapper's parts: model, decoder (once built), tail (the modules after a split inside the
        encoder: their pre-autoencoder weights), representatives, and the state a resume restores (history,
        input size, whether the decoder is trained)."""
        if not self.writes:
            return
        tensors = {"model": model.state_dict()}
        if decoder is not None:
            tensors["decoder"] = decoder.state_dict()
        if tail is not None:
            tensors["tail"] = tail  # tail.safetensors (the run-directory file name)
        writers = {}
        if representatives is not None:
            writers["representatives.safetensors"] = representatives.save
        history = {**history, **({stage: train.history} if train is not None else {})}
        decoder_trained = decoder_trained or (stage == "autoencoder" and epoch >= epochs)
        state = {"history": history, "input_size": list(input_size), "decoder_trained": decoder_trained}
        self.save(stage, epoch, epochs, tensors=tensors, state=state, train=train, writers=writers)

    def deferred(self):
        """A block in which SIGTERM/SIGINT only ask to stop (polled by the loop, or raised at its end)."""
        return self.stop.deferred() if self.stop is not None else nullcontext()

    def run_stages(self, plan: Sequence[Tuple[str, bool, Callable[[], Any]]]) -> None:
        """Run each (stage, enabled, run) of `plan` in order.

        A stage in `done` is passed over and a disabled one recorded as skipped. A stage that raises (or
        is interrupted) is recorded in run.json with the command that resumes it, and the error re-raised;
        its last complete checkpoint stays. A collective that fails under torch.distributed (another rank
        died or timed out) is re-raised as `RankLostError`. With a run directory, SIGTERM and SIGINT
        raise `Interrupted` meanwhile (see `StopSignals`; a training loop polls ``stop`` inside `deferred`).
        """
        stage = None
        with self.stop if self.stop is not None else nullcontext():  # still installed while run.json is written
            try:
                for stage, enabled, run_stage in plan:
                    if stage in self.done:
                        continue
                    if not enabled:
                        if self.writes:
                            self.dir.update_stage(stage, status="skipped")
                        continue
                    run_stage()
            except (Exception, KeyboardInterrupt) as e:
                self._record_failure(stage, e)

    def _record_failure(self, stage: Optional[str], e: BaseException) -> None:
        """Record `e` (raised in `stage`) in run.json and re-raise it (a failed collective as `RankLostError`)."""
        error = e
        if distributed.is_distributed() and distributed.is_collective_error(e):
            error = RankLostError(f"rank {distributed.rank()} lost the other ranks in {stage}: a rank died or "
                                  f"did not answer within the process group's timeout ({e})")
        if self.writes:
            self.dir.fail(stage, error)
            say = _logger.warning if isinstance(error, Interrupted) else _logger.error
            say("%s stopped: %s; %s keeps the last complete checkpoint: %s", stage, error, self.dir.path,
                self.dir.record["how_to_continue"])
        elif isinstance(error, RankLostError):
            _logger.error("%s; rank 0 keeps the run directory's last complete checkpoint", error)
        if error is e:
            raise e
        raise error from e

    def finish(self, model_state: Callable[[], Dict[str, torch.Tensor]]) -> None:
        """Write model.safetensors from ``model_state()`` and mark the run complete (writing rank only)."""
        if self.writes:
            self.dir.finish(model_state())


def run_facts(model: nn.Module, dataset: Dataset, skipped: Dict[str, int], *, seed: int, device: torch.device,
              amp: str) -> Dict[str, Any]:
    """What run.json records about a run: the model's fingerprint, the training data's (and the unreadable
    files left out of it), the seed, the precision, versions and machine."""
    data = {**data_fingerprint(dataset), **({"skipped": skipped} if skipped else {})}
    return {"model": model_fingerprint(model), "data": data, "seed": seed, "precision": precision(device, amp),
            "versions": versions(), "machine": machine(device)}


@dataclass
class Parts:
    """What a wrapper's checkpoint holds beyond the model (`Run.save_parts`): the decoder's state dict and
    representatives (None before they existed), the tail snapshot (None without a split inside the encoder),
    and the state a resume restores."""
    history: Dict[str, Any]
    input_size: Tuple[int, int, int]
    decoder_trained: bool
    decoder: Optional[Dict[str, torch.Tensor]]
    representatives: Optional[Representatives]
    tail: Optional[Dict[str, torch.Tensor]]


def load_parts(ckpt: Checkpoint, model: nn.Module, device: torch.device) -> Parts:
    """Load `ckpt`'s model state into `model` and read the rest of a wrapper's parts (the tail onto `device`).

    Raises:
        ValueError: one of the checkpoint's files is corrupted.
    """
    load_state_into(model, ckpt.tensors("model"), str(ckpt.directory))
    return Parts(history=dict(ckpt.state["history"]), input_size=tuple(ckpt.state["input_size"]),
                 decoder_trained=ckpt.state["decoder_trained"],
                 decoder=ckpt.tensors("decoder") if ckpt.has("decoder.safetensors") else None,
                 representatives=(Representatives.load(ckpt.path("representatives.safetensors"))
                                  if ckpt.has("representatives.safetensors") else None),
                 tail=({k: v.to(device) for k, v in ckpt.tensors("tail").items()}
                       if ckpt.has("tail.safetensors") else None))
