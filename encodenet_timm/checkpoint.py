"""Stage checkpoints: one directory per checkpoint (at an epoch end, or every N steps inside an epoch),
written file by file and made complete by its manifest, read back and verified; the exported model file.

A checkpoint is complete only once its ``manifest.json`` exists: it is written last and records every
file's size and SHA-256. Tensors go to safetensors, optimizer state to ``torch.save`` (read back with
``weights_only=True``), everything else to JSON. Nothing is unpickled. Every file is written atomically
(`files.write_atomic`). Layout of one (inside a run directory, `run_dir.py`)::

    checkpoints/<stage>/epoch-<NNNN>/                after NNNN epochs
    checkpoints/<stage>/epoch-<NNNN>-step-<SSSSSSS>/ inside epoch NNNN+1, after SSSSSSS of its batches
        model.safetensors            the whole model's state_dict
        decoder.safetensors          once the decoder exists
        optimizer.pt                 a stage not yet finished: optimizer.state_dict()
        position.pt                  inside an epoch: per rank, the RNG states and running sums (torch.save)
        representatives.safetensors  from the representatives stage on
        tail.safetensors             the modules after a split inside the encoder: their pre-autoencoder weights
        manifest.json                written last: stage, epoch, files, loop state (JSON)
"""
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from safetensors.torch import save_file

from .files import cpu_copies, load_tensors, read_json, sha256_file, write_atomic, write_json
from .training import TrainState

__all__ = ["MODEL_FILE", "MANIFEST", "POSITION_FILE", "load_model_file", "Checkpoint", "write_checkpoint",
           "checkpoint_dirs", "checkpoint_name", "remove_checkpoints", "timestamp"]

PathLike = Union[str, Path]
MODEL_FILE = "model.safetensors"  # each checkpoint's whole model (and a run directory's exported model)
MANIFEST = "manifest.json"        # a checkpoint's, written last
POSITION_FILE = "position.pt"     # a checkpoint inside an epoch: where each rank's epoch stood
_FORMAT = "encodenet_timm.checkpoint/1"
_CHECKPOINT_DIR = re.compile(r"^epoch-(\d+)(?:-step-(\d+))?$")


def load_model_file(path: PathLike) -> Dict[str, torch.Tensor]:
    """A model's state_dict from a model.safetensors file, a run directory (its model.safetensors), or a
    stage checkpoint directory (its model.safetensors, checked against its manifest).

    Raises:
        FileNotFoundError: nothing to load at `path`.
        ValueError: the file is corrupted or truncated.
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        return Checkpoint.read(path).tensors("model")
    return load_tensors(path / MODEL_FILE if path.is_dir() else path)


class Checkpoint:
    """One complete stage checkpoint: a directory whose manifest lists its files.

    Attributes:
        directory: ``<run_dir>/checkpoints/<stage>/epoch-<NNNN>[-step-<SSSSSSS>]``.
        stage, epoch: the stage, and how many of its `epochs` are complete.
        step: batches of the next epoch already trained (0: at an epoch end).
        state: the JSON state saved with it (loop state, history, ...).
    """

    def __init__(self, directory: Path, manifest: Dict[str, Any]):
        self.directory, self.manifest = directory, manifest
        self.stage: str = manifest["stage"]
        self.epoch: int = manifest["epoch"]
        self.step: int = manifest.get("step", 0)
        self.epochs: int = manifest["epochs"]
        self.state: Dict[str, Any] = manifest["state"]
        self._verified: set = set()  # files whose size and SHA-256 matched the manifest

    @classmethod
    def read(cls, directory: PathLike) -> "Checkpoint":
        """The checkpoint in `directory`; ValueError unless its manifest says it is complete."""
        directory = Path(directory)
        manifest = read_json(directory / MANIFEST)
        if manifest.get("format") != _FORMAT or manifest.get("complete") is not True:
            raise ValueError(f"{directory} is not a complete encodenet_timm checkpoint ({MANIFEST} says otherwise)")
        return cls(directory, manifest)

    @property
    def stage_complete(self) -> bool:
        return self.epoch >= self.epochs

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]

    def path(self, name: str) -> Path:
        """The path of file `name`, checked against the size and SHA-256 its manifest records."""
        entry = self.manifest["files"].get(name)
        path = self.directory / name
        if entry is None or not path.is_file():
            raise ValueError(f"checkpoint {self.directory} has no {name}")
        if name not in self._verified:
            if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                raise ValueError(f"{path} is corrupted or truncated: its size or SHA-256 differs from {MANIFEST}")
            self._verified.add(name)
        return path

    def verify(self) -> None:
        """Check every file against the manifest (`path`); ValueError naming the first that differs."""
        for name in self.manifest["files"]:
            self.path(name)

    def tensors(self, stem: str) -> Dict[str, torch.Tensor]:
        """The named tensors of ``<stem>.safetensors``, verified."""
        return load_tensors(self.path(f"{stem}.safetensors"))

    def train_state(self) -> TrainState:
        """The loop state to continue this stage with (`train_stage(..., resume=...)`)."""
        loop = self.manifest.get("loop")
        if loop is None:
            raise ValueError(f"checkpoint {self.directory} holds no training-loop state")
        optimizer = self._torch_load("optimizer.pt")
        ranks = self._torch_load(POSITION_FILE)["ranks"] if self.step else None
        return TrainState(epoch=self.epoch, num_updates=loop["num_updates"], history=loop["history"],
                          optimizer=optimizer, scheduler=loop["scheduler"], scaler=loop["scaler"], step=self.step,
                          ranks=ranks)

    def _torch_load(self, name: str) -> Any:
        path = self.path(name)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises RuntimeError / UnpicklingError for bad files
            raise ValueError(f"{path} is corrupted or truncated: torch.load(weights_only=True) failed ({e})") from e


def checkpoint_dirs(stage_dir: Path) -> List[Path]:
    """``epoch-NNNN[-step-SSSSSSS]`` directories of one stage, newest (most epochs, then steps) first."""
    if not stage_dir.is_dir():
        return []
    found = [((int(m.group(1)), int(m.group(2) or 0)), d) for d in stage_dir.iterdir()
             if (m := _CHECKPOINT_DIR.match(d.name)) and d.is_dir()]
    return [d for _, d in sorted(found, reverse=True)]


def checkpoint_name(epoch: int, step: int) -> str:
    return f"epoch-{epoch:04d}" + (f"-step-{step:07d}" if step else "")


def remove_checkpoints(stage_dir: Path, keep: Optional[Path]) -> None:
    """Remove every checkpoint of `stage_dir` but `keep`: its manifest first, so that a half-deleted
    directory is never complete."""
    for old in checkpoint_dirs(stage_dir):
        if old != keep:
            (old / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(stage_dir: Path, stage: str, epoch: int, epochs: int, *,
                     tensors: Dict[str, Dict[str, torch.Tensor]], state: Dict[str, Any],
                     train: Optional[TrainState] = None,
                     writers: Optional[Dict[str, Callable[[Path], None]]] = None) -> Checkpoint:
    """Write the checkpoint of `stage` after `epoch` of its `epochs` (and ``train.step`` batches of the
    next) into `stage_dir`; once it is complete, its older checkpoints are removed.

    Args:
        tensors: file stem -> named tensors, each written to ``<stem>.safetensors``.
        state: JSON-able state of the caller (e.g. the history of earlier stages).
        train: the loop state of a training stage: optimizer.pt (torch.save), inside an epoch
            position.pt (torch.save), and the manifest's "loop".
        writers: file name -> function writing that file at the path it is given.
    """
    step = train.step if train is not None else 0
    directory = stage_dir / checkpoint_name(epoch, step)
    (directory / MANIFEST).unlink(missing_ok=True)  # incomplete while its files are rewritten
    files: Dict[str, Callable[[Path], None]] = {
        f"{stem}.safetensors": (lambda p, t=cpu_copies(t): save_file(t, str(p))) for stem, t in tensors.items()}
    if train is not None and epoch < epochs:  # a finished stage is never continued: no optimizer state
        files["optimizer.pt"] = lambda p: torch.save(train.optimizer, p)
        if step:
            files[POSITION_FILE] = lambda p: torch.save({"ranks": train.ranks}, p)
    files.update(writers or {})
    entries = {}
    for name, write in files.items():
        write_atomic(directory / name, write)
        entries[name] = {"bytes": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
    loop = None if train is None else {"num_updates": train.num_updates, "history": train.history,
                                       "scheduler": train.scheduler, "scaler": train.scaler}
    manifest = {"format": _FORMAT, "complete": True, "stage": stage, "epoch": epoch, "step": step,
                "epochs": epochs, "saved": timestamp(), "files": entries, "state": state, "loop": loop}
    write_json(directory / MANIFEST, manifest)
    remove_checkpoints(stage_dir, keep=directory)
    return Checkpoint(directory, manifest)


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
