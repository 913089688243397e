"""Run directories: their layout and file names, what a new run may go into, and the rules of a resume
(what may change, what is refused); one `RunDir` holds the record (run.json), the config, the per-stage
checkpoints (`checkpoint.py`) and the final model. The lifecycle of one fit over it is `run.Run`.

Every file is written atomically (`files.write_atomic`), so a reader never sees half a file; JSON and YAML
here, safetensors for weights; nothing is unpickled.

Layout of a run directory::

    <run_dir>/config.yaml            the full config
    <run_dir>/run.json               versions, machine, seed, model, config (and config.yaml's SHA-256),
                                     per-stage status and history, accepted config changes
    <run_dir>/checkpoints/<stage>/epoch-<NNNN>/   after NNNN epochs: the newest checkpoint of each stage; once the
                                     run is complete, only the last stage's
    <run_dir>/checkpoints/<stage>/epoch-<NNNN>-step-<SSSSSSS>/  inside epoch NNNN+1, after SSSSSSS of its batches
        (a checkpoint's files and manifest: `checkpoint.py`)
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
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import yaml

from .checkpoint import (MANIFEST, MODEL_FILE, Checkpoint, checkpoint_dirs, remove_checkpoints, timestamp,
                         write_checkpoint)
from .checks import check_writable, fingerprint_changes
from .config import EncodeNetConfig
from .errors import DataError, Interrupted
from .files import LOCK_FILE, DirLock, read_json, save_tensors, sha256_file, some, write_atomic, write_json
from .training import TrainState

__all__ = ["CONFIG_FILE", "RECORD_FILE", "MODEL_FILE", "CLI_FILE", "EVAL_FILE", "PICTURES", "SUMMARY_FILE", "RUN_FILES",
           "RUNTIME_CONFIG_KEYS", "check_new_dir", "model_fingerprint", "resume_command", "RunDir", "write_summary"]

_logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
# the files of a run directory (layout above); MODEL_FILE is checkpoint.py's
CONFIG_FILE = "config.yaml"       # the full config, written when the run begins
RECORD_FILE = "run.json"          # the run record
CLI_FILE = "cli.json"             # the `encodenet fit` arguments, written by the command
EVAL_FILE = "eval.json"           # `encodenet evaluate`'s results (eval-<name>.json: of other weights)
PICTURES = ("representatives.png", "reconstructions.png", "curves.png")  # `plots.save_run_plots`'s
SUMMARY_FILE = "summary.csv"      # one row per epoch of every stage (as timm's train.py writes), rewritten each epoch
# what a run directory may hold (fnmatch patterns): a new run may go into a directory holding only these
RUN_FILES = (CONFIG_FILE, RECORD_FILE, MODEL_FILE, CLI_FILE, EVAL_FILE, "eval-*.json", SUMMARY_FILE, *PICTURES,
             LOCK_FILE, "checkpoints", ".*.tmp")
RUNTIME_CONFIG_KEYS = ("device", "progress")  # a resume may change these: where it runs, what it shows
_SECTION_STAGE = {"decoder": "autoencoder"}  # config sections that a stage of another name reads; a section
# named after a stage belongs to it, and every other key (seed, split, amp, ...) to the whole run


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


def resume_command(path: PathLike) -> str:
    """The command that continues the run in `path`: the CLI's when the CLI wrote it (cli.json), else the API's."""
    if (Path(path) / CLI_FILE).is_file():
        return f"encodenet fit --out {path} --resume"
    return f"fit(..., run_dir={str(path)!r}, resume=True)"


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
        for directory in checkpoint_dirs(self.stage_dir(stage)):
            if (directory / MANIFEST).is_file():  # without one it is half written: never complete
                return Checkpoint.read(directory)
        return None

    def latest(self, but: Optional[Path] = None) -> Optional[Checkpoint]:
        """The latest complete checkpoint of the last stage that has one (other than the one in `but`)."""
        for stage in reversed(self.stages):
            for directory in checkpoint_dirs(self.stage_dir(stage)):
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
        self.record = {**info, "status": "running", "started": timestamp(), "updated": timestamp(), "resumed": [],
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
                {"at": timestamp(), "changes": [_change_text(c) for c in changes]})
            self._write_config(config)
        self.record["resumed"] = self.record.get("resumed", []) + [
            {"at": timestamp(), "versions": info.get("versions"), "machine": info.get("machine")}]
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
        """Write the checkpoint of `stage` after `epoch` of its `epochs` (`write_checkpoint`: its older
        checkpoints are removed once it is complete) and record the stage's progress in run.json."""
        ckpt = write_checkpoint(self.stage_dir(stage), stage, epoch, epochs, tensors=tensors, state=state,
                                train=train, writers=writers)
        history = train.history if train is not None else state.get("history", {}).get(stage)
        self.update_stage(stage, status="complete" if epoch >= epochs else "running", epochs_done=epoch,
                          steps_done=ckpt.step, epochs=epochs, **({"history": history} if history is not None else {}))
        return ckpt

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
            remove_checkpoints(self.stage_dir(stage), keep=None if last is None else last.directory)
            if self.stage_dir(stage).is_dir() and not any(self.stage_dir(stage).iterdir()):
                self.stage_dir(stage).rmdir()

    def _write_record(self) -> None:
        self.record["updated"] = timestamp()
        write_json(self.record_path, self.record)


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
