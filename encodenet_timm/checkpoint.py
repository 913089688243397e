"""Run directories: their layout and file names, stage checkpoints (at epoch ends and every N steps
inside an epoch), loading them back safely, and the lifecycle of one `fit(run_dir=...)` (`Run`: begin
or resume, checkpoints, skipped, failed and interrupted stages, finish).

Every file is written atomically (`files.write_atomic`), so a reader never sees half a file. A
checkpoint is complete only once its ``manifest.json`` exists: it is written last and records every
file's size and SHA-256. Tensors go to safetensors, optimizer state to ``torch.save`` (read back with
``weights_only=True``), everything else to JSON or YAML. Nothing is unpickled.

Layout of a run directory::

    <run_dir>/config.yaml            the full config
    <run_dir>/run.json               versions, machine, seed, model, config (and config.yaml's SHA-256),
                                     per-stage status and history, accepted config changes
    <run_dir>/checkpoints/<stage>/epoch-<NNNN>/   after NNNN epochs: the newest checkpoint of each stage; once the
                                     run is complete, only the last stage's
    <run_dir>/checkpoints/<stage>/epoch-<NNNN>-step-<SSSSSSS>/  inside epoch NNNN+1, after SSSSSSS of its batches
        model.safetensors            the whole model's state_dict
        decoder.safetensors          once the decoder exists
        optimizer.pt                 a stage not yet finished: optimizer.state_dict()
        position.pt                  inside an epoch: per rank, the RNG states and running sums (torch.save)
        representatives.safetensors  from the representatives stage on
        tail.safetensors             the modules after a split inside the encoder: their pre-autoencoder weights
        manifest.json                written last: stage, epoch, files, loop state (JSON)
    <run_dir>/model.safetensors      the exported model's state_dict, when the run is complete
    <run_dir>/cli.json, eval.json    the ``encodenet`` command's own: fit arguments, evaluation results
    <run_dir>/*.png                  pictures of the run (`plots.save_run_plots`)
    <run_dir>/.lock                  flock()ed by the one process writing the directory (`DirLock`)

A new run goes only into an empty directory or one holding nothing but files a run writes
(`check_new_dir`): nothing of the user's is overwritten.
"""
import csv
import fnmatch
import hashlib
import re
import shutil
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import yaml
from safetensors.torch import save_file

from . import distributed
from .checks import check_writable, fingerprint_changes
from .config import EncodeNetConfig
from .errors import DataError, Interrupted, RankLostError
from .files import (LOCK_FILE, DirLock, cpu_copies, load_tensors, read_json, save_tensors, sha256_file, some,
                    write_atomic, write_json)
from .stopping import StopSignals
from .training import TrainState

__all__ = ["CONFIG_FILE", "RECORD_FILE", "MODEL_FILE", "CLI_FILE", "EVAL_FILE", "MANIFEST", "PICTURES", "RUN_FILES",
           "RUNTIME_CONFIG_KEYS", "check_new_dir", "load_model_file", "model_fingerprint", "resume_command",
           "Checkpoint", "RunDir", "Run"]

_logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
# the files of a run directory (layout above)
CONFIG_FILE = "config.yaml"       # the full config, written when the run begins
RECORD_FILE = "run.json"          # the run record
MODEL_FILE = "model.safetensors"  # the exported plain timm model (and each checkpoint's whole model)
CLI_FILE = "cli.json"             # the `encodenet fit` arguments, written by the command
EVAL_FILE = "eval.json"           # `encodenet evaluate`'s results (eval-<name>.json: of other weights)
PICTURES = ("representatives.png", "reconstructions.png", "curves.png")  # `plots.save_run_plots`'s
SUMMARY_FILE = "summary.csv"      # one row per epoch of every stage (as timm's train.py writes), rewritten each epoch
MANIFEST = "manifest.json"        # a checkpoint's, written last
# what a run directory may hold (fnmatch patterns): a new run may go into a directory holding only these
RUN_FILES = (CONFIG_FILE, RECORD_FILE, MODEL_FILE, CLI_FILE, EVAL_FILE, "eval-*.json", SUMMARY_FILE, *PICTURES,
             LOCK_FILE, "checkpoints", ".*.tmp")
_FORMAT = "encodenet_timm.checkpoint/1"
_CHECKPOINT_DIR = re.compile(r"^epoch-(\d+)(?:-step-(\d+))?$")
POSITION_FILE = "position.pt"     # a checkpoint inside an epoch: where each rank's epoch stood
RUNTIME_CONFIG_KEYS = ("device", "progress")  # a resume may change these: where it runs, what it shows
_SECTION_STAGE = {"decoder": "autoencoder"}  # config sections that a stage of another name reads; a section
# named after a stage belongs to it, and every other key (seed, split, amp, ...) to the whole run


# ---- files -------------------------------------------------------------------------------------------
def check_new_dir(path: PathLike, ours: Sequence[str] = RUN_FILES, *, what: str = "run directory") -> None:
    """Raise ValueError unless a new run may be written to `path`: it is writable (`check_writable`) and
    absent, empty, or holds only entries matching `ours` (left by one of our runs that stopped early).

    Raises:
        ValueError: naming the directory and the first entries that are not ours.
    """
    path = Path(path)
    check_writable(path)
    if not path.is_dir():
        return
    foreign = sorted(p.name for p in path.iterdir() if not any(fnmatch.fnmatch(p.name, o) for o in ours))
    if foreign:
        raise ValueError(f"{path} is not empty and not a {what} of encodenet_timm (it holds {some(foreign)}); "
                         f"nothing in it is overwritten: choose an empty or new directory (or resume one of "
                         f"our runs)")


def model_fingerprint(model: nn.Module) -> Dict[str, Any]:
    """What identifies a model's architecture: class, timm name, classes, parameter count, and a
    SHA-256 over its state_dict's names, shapes and dtypes."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(f"{key}:{tuple(value.shape)}:{value.dtype}\n".encode())
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}",
            "architecture": cfg.get("architecture"), "num_classes": getattr(model, "num_classes", None),
            "num_params": sum(p.numel() for p in model.parameters()), "layout_sha256": h.hexdigest()}


def _changes(saved: Any, current: Any, prefix: str = "") -> List[Tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) for every key whose value differs between two nested dicts."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in list(saved) + [k for k in current if k not in saved]:
            out += _changes(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == current else [(prefix.rstrip("."), saved, current)]


def _differences(saved: Any, current: Any, prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two nested dicts, as 'key: saved -> current'."""
    return [_change_text(c) for c in _changes(saved, current, prefix)]


def _change_text(change: Tuple[str, Any, Any]) -> str:
    key, saved, current = change
    return f"{key}: {saved!r} -> {current!r}"


def _with_defaults(config: Dict[str, Any], defaults: Dict[str, Any]) -> Dict[str, Any]:
    """`config` with every key it lacks at its default: a partial config, or a config.yaml written before
    a key was added (e.g. ``data``), compares as the run it describes."""
    out = dict(config)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_defaults(out[key], value)
    return out


# ---- checkpoints -------------------------------------------------------------------------------------
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


def _checkpoint_dirs(stage_dir: Path) -> List[Path]:
    """``epoch-NNNN[-step-SSSSSSS]`` directories of one stage, newest (most epochs, then steps) first."""
    if not stage_dir.is_dir():
        return []
    found = [((int(m.group(1)), int(m.group(2) or 0)), d) for d in stage_dir.iterdir()
             if (m := _CHECKPOINT_DIR.match(d.name)) and d.is_dir()]
    return [d for _, d in sorted(found, reverse=True)]


def _checkpoint_name(epoch: int, step: int) -> str:
    return f"epoch-{epoch:04d}" + (f"-step-{step:07d}" if step else "")


def resume_command(path: PathLike) -> str:
    """The command that continues the run in `path`: the CLI's when the CLI wrote it (cli.json), else the API's."""
    if (Path(path) / CLI_FILE).is_file():
        return f"encodenet fit --out {path} --resume"
    return f"fit(..., run_dir={str(path)!r}, resume=True)"


def _remove_checkpoints(stage_dir: Path, keep: Optional[Path]) -> None:
    """Remove every checkpoint of `stage_dir` but `keep`: its manifest first, so that a half-deleted
    directory is never complete."""
    for old in _checkpoint_dirs(stage_dir):
        if old != keep:
            (old / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)


# ---- run directory -----------------------------------------------------------------------------------
class RunDir:
    """A run directory: config, run record, per-stage checkpoints and the final model (layout above).

    Args:
        path: the directory; created on `begin`.
        stages: the stage names in the order they run.
    """

    def __init__(self, path: PathLike, stages: Sequence[str]):
        self.path = Path(path)
        self.stages = tuple(stages)
        self.record: Dict[str, Any] = {}
        self._lock = DirLock(self.path)  # held from `begin` to `close`

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def record_path(self) -> Path:
        return self.path / RECORD_FILE

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    def stage_dir(self, stage: str) -> Path:
        return self.path / "checkpoints" / stage

    def checkpoint(self, stage: str) -> Optional[Checkpoint]:
        """The latest complete checkpoint of `stage`; directories without a manifest are ignored."""
        for directory in _checkpoint_dirs(self.stage_dir(stage)):
            if (directory / MANIFEST).is_file():  # without one it is half written: never complete
                return Checkpoint.read(directory)
        return None

    def latest(self, but: Optional[Path] = None) -> Optional[Checkpoint]:
        """The latest complete checkpoint of the last stage that has one (other than the one in `but`)."""
        for stage in reversed(self.stages):
            for directory in _checkpoint_dirs(self.stage_dir(stage)):
                if directory != but and (directory / MANIFEST).is_file():
                    return Checkpoint.read(directory)
        return None

    def damaged(self, ckpt: Checkpoint, error: ValueError) -> ValueError:
        """The error for checkpoint `ckpt` whose file failed its check (`error`): what to delete to go on."""
        before = self.latest(but=ckpt.directory)
        then = (f"the run then continues from {before.directory} ({before.stage}, {before.epoch} of "
                f"{before.epochs} epochs)" if before is not None else "no earlier checkpoint is left, so start the "
                "run again in a new directory")
        return ValueError(f"{error}; delete {ckpt.directory} and resume again: {then}")

    def begin(self, config: Dict[str, Any], info: Dict[str, Any], resume: bool) -> None:
        """Lock the directory (`DirLock`, until `close`), then start (or, with `resume`, reopen) the run.

        Args:
            config: the full config as a plain dict (written to config.yaml, and to run.json, which also
                records config.yaml's SHA-256 so that a hand edit is found).
            info: run facts for run.json: ``model`` (a `model_fingerprint`), ``data`` (a
                `checks.data_fingerprint`), ``seed``, ``versions``, ``machine``.

        Raises:
            ValueError: resume without a run, with another model, with a config.yaml edited by hand, or
                with a config that changes a stage that has begun (see `_reopen`); a fresh run into a
                directory that already holds checkpoints, or one holding files that are not a run's.
            DataError: resume with training data that differs from the run's (size, labels, order, files).
            RunDirInUseError: another process is writing the directory.
        """
        if resume and not (self.config_path.is_file() and self.record_path.is_file()):
            raise ValueError(f"resume=True but {self.path} holds no run to resume (no config.yaml and run.json); "
                             f"run without resume to start one there")
        if not resume and self.latest() is None:
            check_new_dir(self.path)  # nothing of the user's is overwritten
        self._lock.acquire()
        try:
            self._reopen(config, info) if resume else self._start(config, info)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the directory's lock (taken by `begin`)."""
        self._lock.release()

    def _start(self, config: Dict[str, Any], info: Dict[str, Any]) -> None:
        if self.latest() is not None:
            raise ValueError(f"{self.path} already holds checkpoints of a run; pass resume=True to continue it, "
                             f"or choose a new run directory")
        self.record = {**info, "status": "running", "started": _now(), "updated": _now(), "resumed": [],
                       "stages": {s: {"status": "pending"} for s in self.stages}}
        self._write_config(config)

    def _write_config(self, config: Dict[str, Any]) -> None:
        """config.yaml, then run.json with the config and config.yaml's SHA-256."""
        write_atomic(self.config_path, lambda p: p.write_text(yaml.safe_dump(config, sort_keys=False)))
        self.record["config"] = config
        self.record["config_sha256"] = sha256_file(self.config_path)
        self._write_record()

    def _reopen(self, config: Dict[str, Any], info: Dict[str, Any]) -> None:
        """Reopen the run for `resume`; a config that differs only in stages that have not begun is accepted,
        written to config.yaml and recorded in run.json's ``config_changes``."""
        try:
            on_disk = yaml.safe_load(self.config_path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{self.config_path} is corrupted: not valid YAML ({e})") from e
        self.record = read_json(self.record_path)
        diff = _differences(self.record.get("model"), info["model"], "model.")
        if diff:
            raise ValueError(f"cannot resume {self.path}: it was written for another model ("
                             + "; ".join(diff) + ")")
        saved = self.record.get("config", on_disk)  # runs written before run.json held the config: the file
        if self.record.get("config_sha256") not in (None, sha256_file(self.config_path)):
            edits = _differences(_settings(saved), _settings(on_disk or {}))
            raise ValueError(f"{self.config_path} was edited after the run began ({'; '.join(edits) or 'its text'}); "
                             f"the run's checkpoints were made with the settings {self.record_path.name} records "
                             f"under 'config'. Put those back in {self.config_path.name}, and pass a change to a "
                             f"stage that has not begun in the config given to fit(..., resume=True) (CLI: "
                             f"encodenet fit --out {self.path} --resume --<stage>.<key> VALUE)")
        defaults = EncodeNetConfig().to_dict()  # a key missing on either side (older runs) is at its default
        changes = _changes(_settings(_with_defaults(saved or {}, defaults)), _settings(_with_defaults(config, defaults)))
        refused = [(c, why) for c in changes if (why := self._frozen(c[0])) is not None]
        if refused:
            open_stages = [s for s in self.stages if self._frozen(s + ".") is None]
            raise ValueError(
                f"cannot resume {self.path}: it was written with another config ("
                + "; ".join(f"{_change_text(c)} [{why}]" for c, why in refused) + "). On resume only the "
                "settings of stages that have not begun may change"
                + (f" (here: {', '.join(open_stages)})" if open_stages else " (here: none)")
                + f"; resume with the saved {self.config_path.name}, or choose a new run directory"
                + ("".join(f". To rerun {s} with new settings, delete {self.stage_dir(s)} first: it then restarts "
                           f"from the end of the stage before it" for s in self.stages
                           if (c := self.checkpoint(s)) is not None and not c.stage_complete)))
        changed = fingerprint_changes(self.record.get("data") or {}, info.get("data") or {})
        if changed:
            raise DataError(f"cannot resume {self.path}: the training data changed since the run began ("
                            + "; ".join(changed) + "); resume with the data it began with, or choose a new run "
                            "directory")
        if changes:
            _logger.warning("resuming %s with changed settings of stages that have not begun: %s", self.path,
                            "; ".join(map(_change_text, changes)))
            self.record.setdefault("config_changes", []).append(
                {"at": _now(), "changes": [_change_text(c) for c in changes]})
            self._write_config(config)
        self.record["resumed"] = self.record.get("resumed", []) + [
            {"at": _now(), "versions": info.get("versions"), "machine": info.get("machine")}]
        self.record["status"] = "running"
        self.record.pop("error", None)
        self.record.pop("how_to_continue", None)
        self.record.pop("resume", None)
        self._write_record()

    def _frozen(self, key: str) -> Optional[str]:
        """Why the config `key` (dotted) can no longer change in this run, or None if it can: the stage that
        reads it has a checkpoint or is finished (complete or skipped); a key of the whole run, once any
        stage has a checkpoint."""
        section = key.split(".", 1)[0]
        stage = _SECTION_STAGE.get(section, section)
        if stage not in self.stages:
            first = self.latest()
            return None if first is None else "read by every stage, and the run has begun"
        ckpt = self.checkpoint(stage)
        if ckpt is not None:
            return (f"{stage} is finished" if ckpt.stage_complete
                    else f"{stage} has begun: {ckpt.epoch} of {ckpt.epochs} epochs done")
        status = self.record.get("stages", {}).get(stage, {}).get("status")
        return f"{stage} is {status}" if status in ("complete", "skipped") else None

    def how_to_continue(self, stage: Optional[str]) -> str:
        """What a user does after `stage` stopped: the resume call, and which stages' settings may change."""
        open_stages = [s for s in self.stages if self._frozen(s + ".") is None]
        text = f"continue from its last complete checkpoint with: {resume_command(self.path)}"
        if open_stages:
            text += f"; the settings of {', '.join(open_stages)} may change on resume"
        ckpt = self.checkpoint(stage) if stage in self.stages else None
        if ckpt is not None and not ckpt.stage_complete:
            text += (f"; to rerun {stage} from its start with new settings, delete {ckpt.directory.parent} "
                     f"first")
        return text

    def save(self, stage: str, epoch: int, epochs: int, *, tensors: Dict[str, Dict[str, torch.Tensor]],
             state: Dict[str, Any], train: Optional[TrainState] = None,
             writers: Optional[Dict[str, Callable[[Path], None]]] = None) -> Checkpoint:
        """Write the checkpoint of `stage` after `epoch` of its `epochs` (and ``train.step`` batches of the
        next); once it is complete, its older checkpoints are removed.

        Args:
            tensors: file stem -> named tensors, each written to ``<stem>.safetensors``.
            state: JSON-able state of the caller (e.g. the history of earlier stages).
            train: the loop state of a training stage: optimizer.pt (torch.save), inside an epoch
                position.pt (torch.save), and the manifest's "loop".
            writers: file name -> function writing that file at the path it is given.
        """
        step = train.step if train is not None else 0
        directory = self.stage_dir(stage) / _checkpoint_name(epoch, step)
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
                    "epochs": epochs, "saved": _now(), "files": entries, "state": state, "loop": loop}
        write_json(directory / MANIFEST, manifest)
        _remove_checkpoints(self.stage_dir(stage), keep=directory)
        history = train.history if train is not None else state.get("history", {}).get(stage)
        self.update_stage(stage, status="complete" if epoch >= epochs else "running", epochs_done=epoch,
                          steps_done=step, epochs=epochs, **({"history": history} if history is not None else {}))
        return Checkpoint(directory, manifest)

    def update_stage(self, stage: str, **fields: Any) -> None:
        """Merge `fields` into run.json's record of `stage` and rewrite run.json."""
        self.record.setdefault("stages", {}).setdefault(stage, {}).update(fields)
        self._write_record()

    def fail(self, stage: str, error: BaseException) -> None:
        """Record a failed (or interrupted) stage and the command that resumes it; its last complete
        checkpoint stays."""
        status = "interrupted" if isinstance(error, (KeyboardInterrupt, Interrupted)) else "failed"
        self.record["status"] = status
        self.record["error"] = f"{type(error).__name__}: {error}"
        self.record["how_to_continue"] = self.how_to_continue(stage)
        self.record["resume"] = resume_command(self.path)
        self.update_stage(stage, status=status)

    def finish(self, model_state: Dict[str, torch.Tensor]) -> None:
        """Write model.safetensors (the exported model), mark the run complete, then remove every stage's
        checkpoint but the last one (the whole wrapper: model, decoder, representatives), which a resume of
        the finished run restores; the earlier ones only served to repair a run that had not finished."""
        save_tensors(self.model_path, model_state, metadata={"format": "pt"})
        self.record["status"] = "complete"
        self.record["model_file"] = self.model_path.name
        self._write_record()
        last = self.latest()
        for stage in self.stages:
            _remove_checkpoints(self.stage_dir(stage), keep=None if last is None else last.directory)
            if self.stage_dir(stage).is_dir() and not any(self.stage_dir(stage).iterdir()):
                self.stage_dir(stage).rmdir()

    def _write_record(self) -> None:
        self.record["updated"] = _now()
        write_json(self.record_path, self.record)


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


def write_summary(path: PathLike, history: Dict[str, Any]) -> None:
    """Atomically write `history` (stage -> per-epoch records; non-list entries are left out) as a CSV:
    stage, epoch, then every metric any record has (loss, accuracy, lr, seconds, val_*), blank where absent.
    Epochs count from 1, as the log and curves.png do (a record's ``epoch`` is the loop's index, from 0)."""
    rows = [{"stage": stage, **record, "epoch": record.get("epoch", i) + 1} for stage, records in history.items()
            if isinstance(records, list) for i, record in enumerate(records)]
    if not rows:
        return
    columns = ["stage", "epoch", *dict.fromkeys(k for r in rows for k in r if k not in ("stage", "epoch"))]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
    write_atomic(path, write)


def _settings(config: Dict[str, Any]) -> Dict[str, Any]:
    """`config` without the keys a resume may change freely (`RUNTIME_CONFIG_KEYS`)."""
    return {k: v for k, v in config.items() if k not in RUNTIME_CONFIG_KEYS}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
