"""The report of a `CompareResult` (each function takes one as `result`): its table, results.md (table, verdict, paired differences), the
picture, and the files `save` writes (results.json, results.md, accuracy_vs_compute.png)."""
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from .files import write_atomic, write_json
from .row_names import CONTROLS, base_row, row_what
from .stats import MIN_SEEDS

__all__ = ["table", "markdown", "plot", "save"]


def table(result) -> str:
    """Markdown: per row, what it is, extra compute (supervised epochs), validation mean ± std and, for the
    declared rows, test mean ± std; diverged rows say so."""
    test = result.has_test
    head = "| row | what | extra epochs | val accuracy (%) |" + (" test accuracy (%) |" if test else "")
    lines = [head, "|---|---|---:|---|" + ("---|" if test else "")]
    for r in result.rows:
        val = _pct(result.accuracy(r))
        if result.diverged(r):
            val += " (diverged)"
        cells = [r + (" (EncodeNet's choice)" if r == result.chosen and r != result.default else ""),
                 row_what(r, result.described), f"{result.extra_epochs(r):.2f}", val]
        if test:
            cells.append(_pct(result.accuracy(r, "test")) if r in result.tests else "not tested (not declared)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result) -> str:
    split = result.verdict_split
    lines = ["# EncodeNet against same-size controls at equal extra compute", "",
             f"Seeds {result.seeds}. X = {result.compute['extra_epochs']:.2f} supervised epochs of FLOPs (the "
             f"recipe's extra compute; {result.compute['note']}). Validation chooses; test is read once, after "
             f"the choice, for the declared rows only.", "", table(result), "",
             f"**Verdict:** {result.verdict}", ""]
    for best_of in ((False, True) if result.trials > 1 and result.chosen_trials else (False,)):
        deltas = result.comparisons(split, best_of)
        lines += [f"Paired differences ({split} accuracy, points{', best of k' if best_of else ''}):", "",
                  "| comparison | mean | 95% CI | per seed | p (Holm) | detectable |", "|---|---:|---|---|---:|---:|"]
        for other, d in deltas.items():
            ci = "" if d["ci"] is None or d["n"] < MIN_SEEDS else f"{100 * d['ci'][0]:+.2f}..{100 * d['ci'][1]:+.2f}"
            p = "" if d["p_holm"] is None else f"{d['p_holm']:.3f}"
            det = "" if d["detectable"] is None else f"{100 * d['detectable']:.2f}"
            lines.append(f"| {d['row']} - {other} | {100 * d['mean']:+.2f} | {ci} | "
                         f"{', '.join(f'{100 * v:+.2f}' for v in d['diffs'])} | {p} | {det} |")
        lines.append("")
    lines += [f"- {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def save(result, directory: Union[str, Path]) -> Path:
    """Write results.json (every number, config, versions, machine), results.md and accuracy_vs_compute.png."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "results.json", result.to_dict())
    write_atomic(directory / "results.md", lambda p: p.write_text(markdown(result)))
    plot(result, directory / "accuracy_vs_compute.png")
    return directory


def plot(result, path: Union[str, Path]) -> None:
    """One line per row: each seed's accuracy (dots) and the mean ± std (diamond), the extra compute in each
    label. With a test set, two panels on the same rows: validation (every row; what chose) and test (only the
    rows declared before the choice), never one axis mixing the two splits."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    splits = ["val", "test"] if result.verdict_split == "test" else ["val"]
    rows = list(reversed(result.rows))  # the table's first row on top
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 + 3.5 * len(splits), 0.45 * len(rows) + 1.6),
                             sharey=True, squeeze=False)
    for ax, split in zip(axes[0], splits):
        for y, r in enumerate(rows):
            if split == "test" and r not in result.tests:
                ax.text(0.01, y, "no test: not declared before the choice", fontsize=7, color="tab:gray",
                        va="center", transform=ax.get_yaxis_transform())
                continue
            acc = 100 * np.asarray(result.accuracy(r, split))
            control = r == "baseline" or base_row(r)[0] in CONTROLS
            color = "tab:red" if result.diverged(r) else "tab:gray" if control else "tab:blue"
            ax.scatter(acc, [y] * len(acc), s=14, color=color, alpha=0.6, zorder=3)
            std = acc.std(ddof=1) if len(acc) > 1 else 0.0
            ax.errorbar(acc.mean(), y, xerr=std, fmt="D", color=color, capsize=3, zorder=4)
        ax.set_xlabel(f"{'test' if split == 'test' else 'validation'} accuracy (%): dots = seeds, diamond = mean ± std",
                      fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    labels = [f"{r}  (+{result.extra_epochs(r):.1f} ep){'  [diverged]' if result.diverged(r) else ''}" for r in rows]
    axes[0][0].set_yticks(range(len(rows)), labels, fontsize=8)
    fig.suptitle(f"EncodeNet vs same-size controls at equal extra compute ({len(result.seeds)} seed"
                 f"{'s' * (len(result.seeds) != 1)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pct(values: Sequence[float]) -> str:
    v = 100 * np.asarray(values, dtype=float)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"
