"""The image files behind a dataset, checked before training and named when a read fails.

`scan_files` finds the files that cannot be read (``data.scan``: "verify" or "decode"); `check_files` runs
it on a loader's dataset and stops with their names, or lists them to leave out (``data.skip_unreadable``);
`NamedReads` names the file and index of a read that fails later, inside an epoch.
"""
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, List, Optional, Sequence, Tuple

from torch.utils.data import DataLoader, Dataset, Subset

from .config import SCAN_MODES
from .errors import DataError

__all__ = ["dataset_files", "scan_files", "check_files", "NamedReads"]

_logger = logging.getLogger("encodenet_timm.checks")  # one logger name for every input check (what log lines show)


def dataset_files(dataset: Dataset) -> Optional[List[str]]:
    """The image file of every sample, in dataset order, when the dataset lists them; None otherwise.

    Read from ``.samples`` ((path, label) pairs: torchvision `ImageFolder` / `DatasetFolder`), through
    a `Subset`'s indices.
    """
    if isinstance(dataset, Subset):
        inner = dataset_files(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    samples = getattr(dataset, "samples", None)
    if (isinstance(samples, list) and samples and isinstance(samples[0], (tuple, list))
            and isinstance(samples[0][0], (str, os.PathLike))):
        return [os.fspath(s[0]) for s in samples]
    return None


def scan_files(files: Sequence[str], mode: str = "verify") -> List[Tuple[int, str, str]]:
    """The image files that cannot be read, as (index, path, reason); a few threads read headers at once.

    ``"verify"`` (cheap: headers and checksums, no decoding) opens each file and runs PIL's
    ``verify()``: it catches a missing or empty file, a non-image, a corrupt header, a truncated or
    corrupt PNG (its CRCs), and a JPEG cut short (no end-of-image marker in its last KiB). It misses a
    truncated BMP, GIF or TIFF and a JPEG whose tables are damaged: those fail at their first read,
    named by `NamedReads`. ``"decode"`` decodes every file (about an epoch's reading, without the
    model) and catches all of them. A JPEG whose compressed data is damaged but whose markers are
    intact decodes (PIL fills the rest in grey): no scan finds it. ``"none"`` reads nothing.
    """
    if mode not in SCAN_MODES:
        raise ValueError(f"config key 'data.scan' must be one of {SCAN_MODES}, got {mode!r}")
    if mode == "none" or not files:
        return []
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        reasons = list(pool.map(lambda f: _unreadable(f, decode=mode == "decode"), files, chunksize=64))
    bad = [(i, f, r) for i, (f, r) in enumerate(zip(files, reasons)) if r is not None]
    _logger.info("scanned %d image files (%s) in %.1fs: %d unreadable", len(files), mode,
                 time.perf_counter() - start, len(bad))
    return bad


def check_files(loader: Optional[DataLoader], what: str, *, scan: str = "verify", skip: bool = False) -> List[int]:
    """The dataset indices of `loader`'s unreadable image files (`scan_files`), when its dataset lists its
    files (`dataset_files`); [] otherwise.

    Raises:
        DataError: some file is unreadable and not `skip`; the message names the files (the first five),
            their indices and what to do. With `skip` their count is logged instead.
    """
    done = getattr(loader, "dataset", None)
    if isinstance(done, NamedReads) and done.scanned in (scan, "decode"):  # scanned before (compare's rows)
        return []
    files = None if loader is None else dataset_files(loader.dataset)
    bad = scan_files(files, scan) if files else []
    if not bad:
        return []
    shown = "; ".join(f"index {i}: {path} ({reason})" for i, path, reason in bad[:5])
    shown += "; ..." if len(bad) > 5 else ""
    if not skip:
        raise DataError(f"{len(bad)} image file(s) of {what} cannot be read: {shown}. Remove or replace them, or "
                        f"set data.skip_unreadable=True (encodenet: --data.skip_unreadable true) to train "
                        f"without them", path=bad[0][1], index=bad[0][0])
    _logger.warning("leaving out %d unreadable image file(s) of %s (data.skip_unreadable): %s", len(bad), what, shown)
    return [i for i, _, _ in bad]


def _unreadable(path: str, decode: bool) -> Optional[str]:
    """Why the image file at `path` cannot be read, or None when it can."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            image_format = image.format
            if decode:
                image.load()
            else:
                image.verify()
        if not decode and image_format == "JPEG":
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 1024))
                if b"\xff\xd9" not in f.read():
                    return "truncated JPEG (no end-of-image marker)"
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for a bad file
        return f"{type(e).__name__}: {e}"
    return None


class NamedReads(Subset):
    """`dataset` (every index in order, or `indices`) whose read failures raise `DataError` naming the
    index in `dataset` and the file, instead of the reader's own traceback from deep inside an epoch.

    Args:
        dataset: a map-style dataset.
        files: the image file of each of its indices (`dataset_files`).
        indices: the indices of `dataset` to read; None: all of them.

    Attributes:
        scanned: the ``data.scan`` mode its files have passed (`loaders.readable`); None before a scan.
    """

    def __init__(self, dataset: Dataset, files: Sequence[str], indices: Optional[Sequence[int]] = None):
        super().__init__(dataset, range(len(dataset)) if indices is None else list(indices))
        self.files = files
        self.scanned: Optional[str] = None

    def __getitem__(self, index: int) -> Any:
        i = self.indices[index]
        try:
            return self.dataset[i]
        except Exception as e:  # whatever the image reader raises
            cause = e.__cause__ if isinstance(e, DataError) and e.__cause__ is not None else e  # the reader's own
            raise DataError(f"cannot read sample {i} of the dataset, {self.files[i]} ({type(cause).__name__}: "
                            f"{cause}); remove or replace the file, or set data.scan='decode' and "
                            f"data.skip_unreadable=True to leave out every file that does not decode",
                            path=self.files[i], index=i) from e

    def __getitems__(self, indices: List[int]) -> List[Any]:  # batched fetch: each read named too
        return [self[i] for i in indices]
