"""FeatureStore: an (N, D) feature matrix in RAM or in a raw file read and written in row blocks.

On disk a store is a directory holding ``header.json`` (shape, dtype) and ``features.bin`` (the rows,
little-endian, row-major). The file is accessed with ``os.pread`` / ``os.pwrite`` on a file
descriptor, never mmap-ed: the pages it reads sit in the OS page cache, not in the process's RSS, so
a process holding one class's rows at a time stays small however large N * D is. Writes go to fixed
offsets, so several processes (e.g. DDP ranks on one machine) may write disjoint rows of one store
at once: one creates it, the others `FeatureStore.open` it.
"""
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple, Union

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["FeatureStore"]

_FORMAT = "encodenet_timm.FeatureStore"
_HEADER = "header.json"
_DATA = "features.bin"
_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_IO_BYTES = 64 << 20  # largest single pread/pwrite (Linux caps one call at ~2 GiB)


class FeatureStore:
    """An (N, D) matrix of feature rows, in RAM (``path=None``) or on disk (a directory).

    Creating an on-disk store writes its header and sizes its data file to N * D * itemsize bytes
    (sparse: rows never written read as zeros), discarding any rows a previous store there held.

    Args:
        num_rows: N, rows in the matrix.
        dim: D, values per row.
        path: directory of the on-disk store (created if missing), or None to keep the matrix in RAM.
        dtype: "float32" or "float16", the type rows are stored in (float16 halves the size); rows are
            always read back as float32.

    Raises:
        ValueError: a negative N, a D below 1, or a dtype other than "float32" / "float16".
    """

    def __init__(self, num_rows: int, dim: int, path: Optional[Union[str, Path]] = None, dtype: str = "float32"):
        num_rows, dim, np_dtype = _check_shape(num_rows, dim, dtype)
        self._setup(num_rows, dim, dtype, None if path is None else Path(path))
        if self.path is None:
            self._array = np.zeros((num_rows, dim), dtype=np_dtype)  # (N, D)
            return
        self.path.mkdir(parents=True, exist_ok=True)
        header = {"format": _FORMAT, "version": 1, "num_rows": num_rows, "dim": dim, "dtype": dtype,
                  "byte_order": "little"}
        tmp = self.path / (_HEADER + ".tmp")
        tmp.write_text(json.dumps(header, indent=1))
        os.replace(tmp, self.path / _HEADER)  # readers never see a half-written header
        self._fd = os.open(self.path / _DATA, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, self.nbytes)

    def _setup(self, num_rows: int, dim: int, dtype: str, path: Optional[Path]) -> None:
        self.num_rows, self.dim, self.dtype, self.path = num_rows, dim, dtype, path
        self._np_dtype = _DTYPES[dtype]
        self._row_bytes = dim * self._np_dtype.itemsize
        self._array: Optional[np.ndarray] = None
        self._fd: Optional[int] = None
        self._writable = True

    @classmethod
    def open(cls, path: Union[str, Path]) -> "FeatureStore":
        """Open an existing on-disk store (read-write; read-only when the file permits only that).

        Raises:
            ValueError: `path` holds no store header, or its data file is missing or shorter than the header says.
        """
        path = Path(path)
        header_path = path / _HEADER
        try:
            header = json.loads(header_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is not a FeatureStore: cannot read {header_path} ({e})") from e
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a FeatureStore: {header_path} has no format {_FORMAT!r}")
        try:
            num_rows, dim, _ = _check_shape(header["num_rows"], header["dim"], header["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a valid FeatureStore: bad header {header_path} ({e!r})") from e
        store = cls.__new__(cls)
        store._setup(num_rows, dim, header["dtype"], path)
        data = path / _DATA
        try:
            store._fd = os.open(data, os.O_RDWR)
        except PermissionError:
            store._fd, store._writable = os.open(data, os.O_RDONLY), False
        except FileNotFoundError as e:
            raise ValueError(f"{path} is not a FeatureStore: its data file {data} is missing") from e
        size = os.fstat(store._fd).st_size
        if size < store.nbytes:
            store.close()
            raise ValueError(f"{data} holds {size} bytes but a ({num_rows}, {dim}) {header['dtype']} store needs "
                             f"{store.nbytes}: the file is truncated")
        return store

    @property
    def shape(self) -> Tuple[int, int]:
        return self.num_rows, self.dim

    @property
    def nbytes(self) -> int:
        """Size of the (N, D) matrix in the store's dtype."""
        return self.num_rows * self._row_bytes

    @property
    def closed(self) -> bool:
        return self.path is not None and self._fd is None

    def write(self, start: int, rows: Union[np.ndarray, "torch.Tensor"]) -> None:
        """Store rows (B, D) as rows [start, start + B), converted to the store's dtype.

        Raises:
            ValueError: rows not 2-D with D columns, or [start, start + B) outside [0, N).
        """
        rows = _as_numpy(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows must be (B, {self.dim}) for this store, got shape {rows.shape}")
        start = int(start)
        if start < 0 or start + len(rows) > self.num_rows:
            raise ValueError(f"cannot write rows [{start}, {start + len(rows)}): the store has rows "
                             f"[0, {self.num_rows})")
        rows = np.ascontiguousarray(rows, dtype=self._np_dtype)  # (B, D)
        if self.path is None:
            self._array[start:start + len(rows)] = rows
            return
        fd = self._check_open()
        if not self._writable:
            raise PermissionError(f"{self.path} was opened read-only (no write permission on its data file)")
        view, offset = memoryview(rows.reshape(-1)).cast("B"), start * self._row_bytes
        while len(view):
            done = os.pwrite(fd, view[:_IO_BYTES], offset)
            view, offset = view[done:], offset + done

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows at `indices` (K,), in that order (any order, repeats allowed): (K, D) float32, C-contiguous.

        On disk, each run of consecutive indices is read in one call, so sorted indices with long runs
        are fastest; unsorted or repeated indices cost one extra copy of the result.

        Raises:
            ValueError: indices not 1-D integers in [0, N).
        """
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(f"indices must be a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise ValueError(f"indices must lie in [0, {self.num_rows}), found {idx.min()}..{idx.max()}")
        if self.path is None:
            return np.ascontiguousarray(self._array[idx], dtype=np.float32)
        self._check_open()
        if idx.size < 2 or (np.diff(idx) > 0).all():
            return self._read_sorted(idx)
        uniq, inverse = np.unique(idx, return_inverse=True)
        return self._read_sorted(uniq)[inverse.reshape(-1)]  # (K, D)

    def _read_sorted(self, idx: np.ndarray) -> np.ndarray:
        """Rows at strictly increasing `idx` (K,): (K, D) float32, one pread per run of consecutive rows."""
        out = np.empty((len(idx), self.dim), dtype=np.float32)
        if not len(idx):
            return out
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        starts, ends = np.concatenate([[0], breaks]), np.concatenate([breaks, [len(idx)]])
        for a, b in zip(starts.tolist(), ends.tolist()):
            self._read_run(int(idx[a]), out[a:b])
        return out

    def _read_run(self, first: int, out: np.ndarray) -> None:
        """Read rows [first, first + len(out)) into out (R, D) float32."""
        rows_per_io = max(1, _IO_BYTES // self._row_bytes)
        for s in range(0, len(out), rows_per_io):
            dst = out[s:s + rows_per_io]  # (r, D)
            buf = dst if self._np_dtype == np.float32 else np.empty(dst.shape, dtype=self._np_dtype)
            view, offset = memoryview(buf.reshape(-1)).cast("B"), (first + s) * self._row_bytes
            while len(view):
                done = os.preadv(self._fd, [view], offset)
                if done == 0:
                    raise OSError(f"{self.path / _DATA} ended early at byte {offset} (truncated by another process?)")
                view, offset = view[done:], offset + done
            if buf is not dst:
                dst[...] = buf

    def array(self) -> np.ndarray:
        """The whole matrix: (N, D) float32 (the store's own array for a float32 store in RAM)."""
        if self.path is None and self._np_dtype == np.float32:
            return self._array
        return self.rows(np.arange(self.num_rows))

    def flush(self) -> None:
        """Make written rows durable (fsync); nothing to do in RAM."""
        if self.path is not None:
            os.fsync(self._check_open())

    def close(self) -> None:
        """Release the file descriptor (idempotent); a closed store refuses reads and writes."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _check_open(self) -> int:
        if self._fd is None:
            raise ValueError(f"the FeatureStore at {self.path} is closed")
        return self._fd

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.close()

    def __getstate__(self) -> dict:
        """Pickled (e.g. into a spawned worker), an on-disk store carries its path, not its fd, and reopens."""
        state = dict(self.__dict__)
        state["_fd"] = None if self._fd is None else -1
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._fd is not None:
            self._fd = os.open(self.path / _DATA, os.O_RDWR if self._writable else os.O_RDONLY)

    def __repr__(self) -> str:
        where = "RAM" if self.path is None else str(self.path)
        return f"FeatureStore(num_rows={self.num_rows}, dim={self.dim}, dtype={self.dtype!r}, path={where})"


def _as_numpy(rows) -> np.ndarray:
    """An array or a torch tensor (any device, bfloat16 included) as a numpy array."""
    if isinstance(rows, np.ndarray):
        return rows
    import torch  # only for tensors: the module itself needs numpy alone (fast to load in worker processes)
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().cpu()
        return (rows.float() if rows.dtype == torch.bfloat16 else rows).numpy()  # numpy has no bfloat16
    return np.asarray(rows)


def _check_shape(num_rows: int, dim: int, dtype: str) -> Tuple[int, int, np.dtype]:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if isinstance(num_rows, bool) or isinstance(dim, bool) or int(num_rows) != num_rows or int(dim) != dim:
        raise ValueError(f"num_rows and dim must be ints, got {num_rows!r} and {dim!r}")
    if num_rows < 0 or dim < 1:
        raise ValueError(f"a FeatureStore needs num_rows >= 0 and dim >= 1, got ({num_rows}, {dim})")
    return int(num_rows), int(dim), _DTYPES[dtype]
