"""Pictures of a run: the representatives per class, autoencoder input -> output -> target, training curves.

Figures are drawn with matplotlib's object API (``matplotlib.figure.Figure``), so nothing is displayed
and pyplot's global backend is left alone.
"""
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .run_dir import PICTURES  # the file names, part of a run directory's layout

__all__ = ["save_run_plots"]

Denormalize = Callable[[torch.Tensor], torch.Tensor]
_CELL = 1.0  # inches per image


def save_run_plots(wrapper, run_dir: Union[str, Path], dataset: Optional[Dataset] = None,
                   denormalize: Optional[Denormalize] = None, *, classes: Optional[Sequence[str]] = None,
                   per_class: int = 2, max_classes: int = 20) -> List[Path]:
    """Write the pictures of a fitted `EncodeNetWrapper` into `run_dir`; return the paths written.

    * ``representatives.png``: one row per class, its representative images.
    * ``reconstructions.png``: per class, `per_class` training images as input -> autoencoder output
      -> the representative it was trained towards.
    * ``curves.png``: loss and accuracy per epoch, one panel per training stage in ``wrapper.history``.

    A picture whose stage has not run is skipped. Only the first `max_classes` classes are drawn.

    Args:
        wrapper: a fitted (or partly fitted) `EncodeNetWrapper`.
        run_dir: folder for the PNGs (created if missing).
        dataset: the training set the representatives were selected on (same order), yielding
            (image (C, H, W) normalised, label). None: the representatives themselves are the inputs.
        denormalize: maps normalised images (N, C, H, W) to [0, 1]; None: each image is stretched to
            its own min..max.
        classes: class names in label order; default the label numbers.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    written = []
    reps = wrapper.representatives
    if reps is not None:
        written.append(_save(_representatives_figure(reps, denormalize, classes, max_classes),
                             run_dir / PICTURES[0]))
        if "autoencoder" in wrapper.history:
            written.append(_save(_reconstructions_figure(wrapper, dataset, denormalize, classes, per_class,
                                                         max_classes), run_dir / PICTURES[1]))
    stages = {k: v for k, v in wrapper.history.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
    if stages:
        written.append(_save(_curves_figure(stages), run_dir / PICTURES[2]))
    return written


# ---- figures ------------------------------------------------------------------------------------------
def _figure(rows: int, cols: int, title: str):
    from matplotlib.figure import Figure  # no pyplot: no backend switch, no window
    fig = Figure(figsize=(_CELL * cols + 1.0, _CELL * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    return fig, axes


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=80, bbox_inches="tight")
    return path


def _shown_classes(labels: torch.Tensor, max_classes: int) -> List[int]:
    return sorted(set(labels.tolist()))[:max_classes]


def _name(classes: Optional[Sequence[str]], c: int) -> str:
    return str(classes[c]) if classes is not None else str(c)


def _title(what: str, shown: int, total: int) -> str:
    return what if shown == total else f"{what} (first {shown} of {total} classes)"


def _representatives_figure(reps, denormalize: Optional[Denormalize], classes, max_classes: int):
    cluster_labels = reps.cluster_labels.cpu()
    shown = _shown_classes(cluster_labels, max_classes)
    cols = int(np.bincount(cluster_labels.numpy()).max())
    fig, axes = _figure(len(shown), cols, _title("representative images per class",
                                                 len(shown), len(set(cluster_labels.tolist()))))
    images = _display(reps.images, denormalize)
    for r, c in enumerate(shown):
        for j, m in enumerate(torch.nonzero(cluster_labels == c).flatten().tolist()):
            _show(axes[r, j], images[m])
        _row_label(axes[r, 0], _name(classes, c))
    return fig


def _reconstructions_figure(wrapper, dataset: Optional[Dataset], denormalize: Optional[Denormalize], classes,
                            per_class: int, max_classes: int):
    reps = wrapper.representatives
    if dataset is None:  # the representatives are inputs and targets
        labels, targets = reps.cluster_labels.cpu(), torch.arange(reps.num_clusters)
    else:
        if len(dataset) != reps.labels.numel():
            raise ValueError(f"dataset has {len(dataset)} images but the representatives were selected on "
                             f"{reps.labels.numel()}; pass the training set they were selected on")
        labels, targets = reps.labels.cpu(), reps.cluster_ids.cpu()
    shown = _shown_classes(labels, max_classes)
    groups = [torch.nonzero(labels == c).flatten()[:per_class].tolist() for c in shown]
    picks = [i for group in groups for i in group]
    if dataset is None:
        x = reps.images[picks]  # (P, C, H, W)
    else:
        x = torch.stack([dataset[i][0] for i in picks])  # (P, C, H, W)
    out = wrapper.reconstruct(x)  # (P, C, H, W)
    target = reps.images[targets[picks]]  # (P, C, H, W)
    columns = [_display(t, denormalize) for t in (x, out, target)]
    fig, axes = _figure(len(shown), 3 * per_class, _title("input -> autoencoder output -> its representative",
                                                          len(shown), len(set(labels.tolist()))))
    p = 0
    for r, (c, group) in enumerate(zip(shown, groups)):
        _row_label(axes[r, 0], _name(classes, c))
        for j in range(len(group)):
            for k, images in enumerate(columns):
                _show(axes[r, 3 * j + k], images[p])
                if r == 0:
                    axes[r, 3 * j + k].set_title(("input", "output", "target")[k], fontsize=8)
            p += 1
    return fig


# one colour per data split, the same in every panel: training solid, validation dashed
_SPLITS = (("", "training", "C0", "-"), ("val_", "validation", "C1", "--"))


def _curves_figure(stages: dict):
    """Loss (top row) and accuracy (bottom row, 0-100% in every panel, so a point of accuracy looks the
    same size everywhere) per epoch, counted from 1, one column per stage; one legend, below the panels."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator
    with_accuracy = any("accuracy" in r or "val_accuracy" in r for records in stages.values() for r in records)
    rows = 2 if with_accuracy else 1
    fig = Figure(figsize=(3.2 * len(stages) + 0.6, 2.4 * rows + 0.7), layout="constrained")
    axes = fig.subplots(rows, len(stages), squeeze=False, sharex="col")
    for col, (stage, records) in enumerate(stages.items()):
        epochs = [r.get("epoch", i) + 1 for i, r in enumerate(records)]  # the log's and summary.csv's count
        for row, (metric, scale) in enumerate((("loss", 1.0), ("accuracy", 100.0))[:rows]):
            ax = axes[row, col]
            for prefix, _, colour, style in _SPLITS:
                values = [r.get(prefix + metric, np.nan) for r in records]
                if not np.isnan(values).all():
                    ax.plot(epochs, np.asarray(values, dtype=float) * scale, style, color=colour, marker=".")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if metric == "accuracy":
                ax.set_ylim(0, 100)
                if not ax.lines:
                    ax.text(0.5, 0.5, "no accuracy\nin this stage", transform=ax.transAxes, ha="center",
                            va="center", fontsize=8, color="0.5")
            else:
                ax.set_ylim(bottom=0)
                ax.set_title(stage)
            if col == 0:
                ax.set_ylabel("loss" if metric == "loss" else "accuracy (%)")
        axes[-1, col].set_xlabel("epoch")
    handles = [Line2D([], [], color=colour, linestyle=style, marker=".") for _, _, colour, style in _SPLITS]
    fig.legend(handles, [name for _, name, _, _ in _SPLITS], loc="outside lower center", ncols=2, fontsize=8)
    return fig


# ---- images -------------------------------------------------------------------------------------------
def _display(x: torch.Tensor, denormalize: Optional[Denormalize]) -> np.ndarray:
    """Normalised images (N, C, H, W) -> (N, H, W, 3) RGB or (N, H, W) grey, values in [0, 1]."""
    x = x.detach().float().cpu()
    if denormalize is not None:
        x = denormalize(x).clamp(0.0, 1.0)
    else:  # stretch each image to its own range
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
    if x.shape[1] == 3:
        return x.permute(0, 2, 3, 1).numpy()  # (N, 3, H, W) -> (N, H, W, 3)
    return x.mean(1).numpy()  # (N, C, H, W) -> (N, H, W): grey (1 channel, or the mean of C != 3)


def _show(ax, image: np.ndarray) -> None:
    ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0)  # cmap only applies to (H, W) grey images


def _row_label(ax, text: str) -> None:
    ax.text(-0.08, 0.5, text, transform=ax.transAxes, ha="right", va="center", fontsize=8)
