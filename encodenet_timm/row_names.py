"""A comparison's rows by name: the controls, the trials of the lr grid (``row@t<k>``), what each row is,
which rows the test reads, and where each (row, seed) keeps its record and weights."""
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["CONTROLS", "TRIAL_FACTORS", "trial_name", "base_row", "ordered_rows", "row_what", "declared_rows",
           "weights_path", "record_path"]

CONTROLS = ("continued", "kd", "ema", "equal")
TRIAL_FACTORS = (1.0, 1 / 3, 3.0, 1 / 9, 9.0)  # trial t scales the side's lrs by TRIAL_FACTORS[t]
_WHAT = {
    "baseline": "the baseline (starting point of every row but equal)",
    "encodenet": "EncodeNet with the given config",
    "continued": "baseline trained X more epochs (controls' restart schedule)",
    "ema": "weight average (ModelEmaV3) of the continued run",
    "kd": "timm LogitDistillationTask, teacher = baseline, X epochs of FLOPs",
    "equal": "from scratch, one schedule of baseline + X epochs",
}


def trial_name(row: str, trial: int) -> str:
    """``row`` for trial 0 (the default settings), ``row@t<k>`` for trial k of the lr grid."""
    return row if trial == 0 else f"{row}@t{trial}"


def base_row(name: str) -> Tuple[str, int]:
    """``"kd@t2"`` -> ("kd", 2); ``"kd"`` -> ("kd", 0)."""
    row, _, trial = name.partition("@t")
    return row, int(trial) if trial else 0


def ordered_rows(rows: Iterable[str], variants: Sequence[str] = ()) -> List[str]:
    """`rows` in the one order every table and report uses, whoever lists them: baseline, EncodeNet, the
    variants (in `variants`' order, others by name), then the controls in ``CONTROLS`` order; each side's
    trials by number. A live `compare` and `CompareResult.load` of its folder thus agree row for row."""
    variants = list(variants)

    def key(name: str) -> Tuple[int, int, str, int]:
        row, trial = base_row(name)
        if row == "baseline":
            return 0, 0, "", trial
        if row == "encodenet":
            return 1, 0, "", trial
        if row in CONTROLS:
            return 3, CONTROLS.index(row), "", trial
        return 2, variants.index(row) if row in variants else len(variants), row, trial
    return sorted(rows, key=key)


def row_what(name: str, described: Optional[Dict[str, str]] = None) -> str:
    row, trial = base_row(name)
    what = (described or {}).get(row) or _WHAT.get(row, "EncodeNet variant")
    if trial:
        lrs = "every stage's lr" if row == "encodenet" else "lr"
        what += f" ({lrs} x {TRIAL_FACTORS[trial]:.3g})"
    return what


def declared_rows(rows: Sequence[str], chosen: Optional[str], chosen_trials: Dict[str, str],
                  default: str = "encodenet") -> List[str]:
    """The rows whose test accuracy is read, fixed by rule before any row trains: baseline, the default
    recipe, the chosen EncodeNet row, paper, every control, and each side's chosen trial; in table order."""
    wanted = {"baseline", default, "paper", *CONTROLS, *chosen_trials.values()}
    if chosen is not None:
        wanted.add(chosen)
    return [r for r in rows if r in wanted]


def weights_path(out_dir: Path, row: str, seed: int) -> Path:
    return out_dir / "weights" / f"{row}-seed{seed}.safetensors"


def record_path(out_dir: Path, row: str, seed: int) -> Path:
    return out_dir / "runs" / f"{row}-seed{seed}.json"
