"""Files a reader never sees half of, read back without unpickling, and directories that one process
writes at a time.

`write_atomic` writes to a temporary file in the same directory, fsyncs it, then renames it over the
name (``os.replace``) and fsyncs the directory; the file gets the mode the umask gives a new file
(`follow_umask`; safetensors' own writer makes 0600). Tensors go to safetensors (`save_tensors`,
`load_tensors`), everything else here to JSON (`write_json`, `read_json`); a corrupted or truncated file is
a ValueError that names it. `DirLock` is an ``flock`` on ``DIR/.lock``, which the OS releases however the process ends.
"""
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import RunDirInUseError

try:
    import fcntl
except ImportError:  # not POSIX (Windows): directories are not locked
    fcntl = None

__all__ = ["LOCK_FILE", "write_atomic", "follow_umask", "DirLock", "write_json", "read_json", "save_tensors",
           "load_tensors", "load_state_into", "sha256_file", "cpu_copies", "some"]

PathLike = Union[str, Path]
LOCK_FILE = ".lock"  # flock()ed while a process writes the directory


def write_atomic(path: PathLike, write: Callable[[Path], None]) -> None:
    """Write `path` through ``write(tmp_path)``, fsync, then rename: `path` is never half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        follow_umask(tmp)
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def follow_umask(path: PathLike) -> None:
    """Give the file `path` the mode an ordinary new file gets (0o666 less the umask, 0644 under the usual
    022), whatever mode its writer chose."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask, read from /proc where it is there (setting it to read it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# which directories this process holds locked: resolved path -> [open lock file, DirLock objects holding it]
_HELD: Dict[Path, List[Any]] = {}


class DirLock:
    """An exclusive lock on a directory, so that two processes never write it at once.

    ``flock`` on ``DIR/.lock``, held open while the process writes: the OS releases it when the process
    ends, however it ends (a stale ``.lock`` left by a killed process never blocks a resume). Within one
    process the lock is re-entrant (the CLI holds it around `EncodeNetWrapper.fit`, which takes it too).
    Each `DirLock` is acquired at most once; `release` undoes that.
    """

    def __init__(self, directory: PathLike):
        self.path = Path(directory)
        self._key: Optional[Path] = None

    def acquire(self) -> "DirLock":
        """Create the directory if needed and lock it.

        Raises:
            RunDirInUseError: another process holds the lock; the message names it (pid and host).
        """
        if self._key is not None or fcntl is None:
            return self
        self.path.mkdir(parents=True, exist_ok=True)
        key = self.path.resolve()
        if key not in _HELD:
            fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # BlockingIOError: held elsewhere
                holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunDirInUseError(
                    f"{self.path} is being written by {holder} (it holds {key / LOCK_FILE}); wait for it to end "
                    f"or stop it, then try again, or choose another directory") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
            _HELD[key] = [fd, 0]
        _HELD[key][1] += 1
        self._key = key
        return self

    def release(self) -> None:
        """Undo `acquire` (the lock itself goes once no `DirLock` of this process holds it)."""
        key, self._key = self._key, None
        if key is None or key not in _HELD:
            return
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            os.close(_HELD.pop(key)[0])  # closing the file releases the flock

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def write_json(path: PathLike, data: Dict[str, Any], *, indent: int = 1, newline: bool = False) -> None:
    """Atomically write `data` as indented JSON (`newline`: end the file with one)."""
    text = json.dumps(data, indent=indent) + ("\n" if newline else "")
    write_atomic(path, lambda p: p.write_text(text))


def read_json(path: PathLike) -> Dict[str, Any]:
    """A JSON object from `path`; ValueError when the file is not one (corrupted or truncated)."""
    try:
        data = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is corrupted or truncated: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} is corrupted: expected a JSON object, got {type(data).__name__}")
    return data


def save_tensors(path: PathLike, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Atomically write named tensors to a safetensors file (CPU copies, so shared storage is fine)."""
    on_cpu = cpu_copies(tensors)
    write_atomic(path, lambda p: save_file(on_cpu, str(p), metadata=metadata))


def load_tensors(path: PathLike) -> Dict[str, torch.Tensor]:
    """Named CPU tensors from a safetensors file.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the file is not valid safetensors (corrupted or truncated).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path} is corrupted or truncated: not a readable safetensors file ({e})") from e


def load_state_into(module: nn.Module, tensors: Dict[str, torch.Tensor], source: str) -> None:
    """Load `tensors` into `module` (strict), after checking names and shapes.

    Raises:
        ValueError: keys are missing or unexpected, or a shape differs; the message names them and
            says the file was written for another model.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    what = f"{source} does not fit this {type(module).__name__} (it was saved from another model)"
    if missing or unexpected:
        raise ValueError(f"{what}: {len(missing)} missing keys {some(missing)}, "
                         f"{len(unexpected)} unexpected keys {some(unexpected)}")
    for key, value in own.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise ValueError(f"{what}: {key!r} has shape {tuple(tensors[key].shape)} in the file but "
                             f"{tuple(value.shape)} in the model")
    module.load_state_dict(tensors)


def some(keys: List[str], n: int = 3) -> str:
    """The first `n` of `keys`, quoted, for a message: "['a', 'b', ...]"."""
    return "[" + ", ".join(map(repr, keys[:n])) + (", ..." if len(keys) > n else "") + "]"


def sha256_file(path: PathLike) -> str:
    """The SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cpu_copies(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (never views of the originals' storage)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
