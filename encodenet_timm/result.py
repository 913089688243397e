"""`CompareResult`: every row of a `compare` per seed, the choice on validation, the sealed test, and the
verdict; its table, files and picture are written by `report.py`.

Validation chooses; the test set only reports. A result holds test accuracy only for the rows declared
before the choice (`declared_rows`: the baseline, the default recipe, the EncodeNet row chosen on
validation, ``paper`` when it is a row, and each control with its chosen trial), measured after the
choice; every other row (variants, unchosen trials) carries none. The verdict speaks on test when there
is one, else on validation, and only with the statistics the seeds carry (`encodenet_timm.stats`).
"""
import dataclasses
from copy import deepcopy
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file

from . import report
from .controls import divergence, train_seconds
from .env import machine, versions
from .files import read_json
from .row_names import CONTROLS, base_row, declared_rows, ordered_rows, row_what, trial_name, weights_path
from .seeding import seed_everything
from .stats import MIN_SEEDS, describe, holm, paired_difference

__all__ = ["CompareResult"]


def _described_before(directory: Path) -> Dict[str, str]:
    """What each variant row is, as the folder's last report (results.json) said: a report regenerated
    without the variants' descriptions keeps them."""
    path = directory / "results.json"
    rows = (read_json(path).get("rows") or {}) if path.is_file() else {}
    return {r: v["what"] for r, v in rows.items() if "@t" not in r and isinstance(v, dict)
            and isinstance(v.get("what"), str) and base_row(r)[0] not in ("baseline", "encodenet", *CONTROLS)}


@dataclasses.dataclass
class CompareResult:
    """Every row's validation accuracy per seed, the sealed test of the declared rows, and the verdict.

    Attributes:
        records: row -> seed -> record (val_accuracy, extra_epochs, history, diverged, train_seconds: the
            training epochs' time over every process, seconds: the finishing process's wall time, ...).
        compute: `count_compute`'s figures for the recipe (and ``variants``: the same per variant row).
        seeds: the seeds every row finished.
        controls: the control rows asked for (trial 0 names).
        tests: row -> seed -> test accuracy, for the declared rows only (empty without a test set).
        chosen: the EncodeNet row (default, trial or variant) with the highest mean validation accuracy.
        chosen_trials: with ``trials > 1``, per side ("encodenet" and each restarted control) its trial with
            the highest mean validation accuracy: the best-of-k verdict compares these.
        trials: validation trials each side got (1: the defaults only).
        notes: what was left out and why (e.g. ``equal`` when the baseline came trained).
        described: row -> what it is, for rows compare does not name itself (variants).
        default: the EncodeNet row the verdict speaks for ("encodenet": the config given to compare).
    """
    records: Dict[str, Dict[int, Dict[str, Any]]]
    compute: Dict[str, Any]
    seeds: List[int]
    controls: List[str]
    config: Dict[str, Any]
    notes: List[str]
    tests: Dict[str, Dict[int, float]] = dataclasses.field(default_factory=dict)
    chosen: Optional[str] = None
    chosen_trials: Dict[str, str] = dataclasses.field(default_factory=dict)
    trials: int = 1
    described: Dict[str, str] = dataclasses.field(default_factory=dict)
    default: str = "encodenet"
    model_fn: Optional[Callable[[], nn.Module]] = dataclasses.field(default=None, repr=False)
    out_dir: Optional[Path] = None
    _weights: Dict[Tuple[str, int], Dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict, repr=False)

    # ---- reading a comparison back
    @classmethod
    def load(cls, directory: Union[str, Path], seeds: Optional[Sequence[int]] = None,
             model_fn: Optional[Callable[[], nn.Module]] = None, described: Optional[Dict[str, str]] = None,
             default: str = "encodenet") -> "CompareResult":
        """A comparison's result read back from its `out_dir` (runs/*.json, compute.json, test.json), training
        and evaluating nothing: the rows finished on every one of `seeds` (default: every seed with a
        baseline). Test accuracy is read only for the rows declared before the choice, once every row has
        finished, from test.json, or, for records written before the test was sealed, from the value each
        measured blind at its end. Variants keep the descriptions a previous `save` wrote (results.json)
        unless `described` gives others. Control rows written before `ControlsConfig` existed are marked as such
        in `notes`, and a row whose history shows a divergence (`controls.divergence`) is marked diverged.
        """
        directory = Path(directory)
        records: Dict[str, Dict[int, Dict[str, Any]]] = {}
        for path in sorted((directory / "runs").glob("*.json")):
            record = read_json(path)
            row = _LEGACY_NAMES.get(record["row"], record["row"])
            records.setdefault(row, {})[int(record["seed"])] = record
        if "baseline" not in records:
            raise ValueError(f"{directory / 'runs'} holds no baseline record: nothing to report")
        seeds = sorted(records["baseline"]) if seeds is None else [int(s) for s in seeds]
        compute = read_json(directory / "compute.json") if (directory / "compute.json").is_file() else {}
        order = ordered_rows(records, [v for v in (compute.get("variants") or {}) if v != default])
        finished = [r for r in order if all(s in records[r] for s in seeds)]
        notes = []
        if len(finished) < len(order):
            notes.append(f"partial: {', '.join(r for r in order if r not in finished)} not finished on every seed "
                         f"{seeds}; no test until they are")
        records = {r: {s: dict(records[r][s]) for s in seeds} for r in finished}
        legacy = [r for r in records if base_row(r)[0] in CONTROLS and r != "equal"
                  and not isinstance((records[r][seeds[0]].get("fingerprint") or {}).get("controls"), dict)]
        for r in records:
            for s in seeds:
                rec = records[r][s]
                rec.setdefault("diverged", None)
                hist = rec.get("history")
                rec.setdefault("train_seconds", train_seconds(hist))  # records written before it was kept
                if rec["diverged"] is None and isinstance(hist, list) and hist and r != "baseline":
                    start = _last_accuracy(records["baseline"][s]) if base_row(r)[0] != "equal" else None
                    rec["diverged"] = divergence(hist, start)  # the loss from the row's first epoch
        if legacy:
            notes.append(f"{', '.join(legacy)}: trained before the controls had their own settings (restarted at "
                         f"the fine-tune lr with no warm-up and no clipping); kept as they ran")
        controls = [c for c in CONTROLS if c in records]
        trials = 1 + max([base_row(r)[1] for r in records] or [0])
        recipes = [r for r in records if base_row(r)[0] not in ("baseline", *CONTROLS)]
        chosen = _choose_on_val(records, recipes)
        chosen_trials = {}
        if trials > 1:
            for side in ("encodenet", *[c for c in controls if c != "equal"]):
                best = _choose_on_val(records, [trial_name(side, t) for t in range(trials)])
                if best is not None:
                    chosen_trials[side] = best
        tests: Dict[str, Dict[int, float]] = {}
        if len(finished) == len(order):
            sealed = read_json(directory / "test.json") if (directory / "test.json").is_file() else {}
            for r in declared_rows(list(records), chosen, chosen_trials, default):
                values = [_sealed_test(sealed, records, r, s) for s in seeds]
                if all(v is not None for v in values):
                    tests[r] = dict(zip(seeds, values))
        legacy_x = ((compute.get("variants") or {}).get(default) or {})
        compute.setdefault("extra_epochs", legacy_x.get("extra_epochs", float("nan")) if isinstance(legacy_x, dict)
                           else float("nan"))  # older folders counted each recipe row's compute separately
        compute.setdefault("note", "FLOPs counted with FlopCounterMode on the real stage code (compute.json)")
        config = (records.get(default, {}).get(seeds[0], {}).get("fingerprint") or {}).get("config", {})
        return cls(records=records, compute=compute, seeds=seeds, controls=controls, config=config, notes=notes,
                   tests=tests, chosen=chosen, chosen_trials=chosen_trials, trials=trials,
                   described={**_described_before(directory), **(described or {})}, default=default,
                   model_fn=model_fn, out_dir=directory)

    # ---- rows and numbers
    @property
    def rows(self) -> List[str]:
        return list(self.records)

    @property
    def has_test(self) -> bool:
        return bool(self.tests)

    def diverged(self, row: str) -> Optional[str]:
        """Why `row` diverged on some seed ("seed 1: ..."), or None."""
        notes = [f"seed {s}: {self.records[row][s]['diverged']}" for s in self.seeds
                 if self.records[row][s].get("diverged")]
        return "; ".join(notes) or None

    def accuracy(self, row: str, split: str = "val") -> List[float]:
        """The row's accuracy per seed on ``"val"`` or ``"test"`` (test: declared rows only)."""
        if split == "test":
            if row not in self.tests:
                raise ValueError(f"{row!r} has no test accuracy: only the rows declared before the choice are "
                                 f"tested ({', '.join(self.tests) or 'none: no test set'})")
            return [self.tests[row][s] for s in self.seeds]
        if split != "val":
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        return [self.records[row][s]["val_accuracy"] for s in self.seeds]

    def extra_epochs(self, row: str) -> float:
        return float(np.mean([self.records[row][s]["extra_epochs"] for s in self.seeds]))

    @property
    def best(self) -> str:
        """The row with the highest mean validation accuracy among rows that did not diverge; a tie goes to
        the row listed first (the baseline first, then the table's order)."""
        return max((r for r in self.rows if not self.diverged(r)), key=lambda r: np.mean(self.accuracy(r)))

    @property
    def verdict_split(self) -> str:
        """The split the verdict speaks on: "test" when compare had a test set, else "val"."""
        return self._split(None)

    def _split(self, split: Optional[str]) -> str:
        if split is None:
            return "test" if self.has_test else "val"
        if split not in ("val", "test") or (split == "test" and not self.has_test):
            raise ValueError(f"split must be 'val' or 'test' (test only when compare got a test_loader), got {split!r}")
        return split

    def comparisons(self, split: Optional[str] = None, best_of: bool = False,
                    mine: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
        """The EncodeNet row (the default; with `best_of`, the chosen one; or the row `mine`) minus the baseline
        and each control (its default; with `best_of`, its chosen trial), paired over seeds on `split`, with
        Holm-corrected p-values across these comparisons (``p_holm``). Diverged rows are left out."""
        split = self._split(split)
        if mine is None:
            mine = self.chosen_trials.get("encodenet", self.default) if best_of else self.default
        others = ["baseline"] + [self.chosen_trials.get(c, c) if best_of else c for c in self.controls]
        others = [o for o in others if o in self.records and o != mine and not self.diverged(o)]
        if mine not in self.records or self.diverged(mine):
            return {}
        out = {o: paired_difference(self.accuracy(mine, split), self.accuracy(o, split)) for o in others}
        for o, p in zip(out, holm([d["p"] if d["n"] >= MIN_SEEDS else None for d in out.values()])):
            out[o]["p_holm"] = p
            out[o]["row"] = mine
        return out

    deltas = comparisons

    @property
    def verdict(self) -> str:
        """Plain sentences: the default recipe (and, with trials, the best of k against the best of k) against
        the baseline and each control, on test when there is one, else on validation."""
        return self.verdict_on(None)

    def verdict_on(self, split: Optional[str]) -> str:
        """`verdict` on ``"val"`` or ``"test"`` accuracy."""
        split = self._split(split)
        n = len(self.seeds)
        sentences = [self._sentence(split, best_of=False)]
        if self.trials > 1 and self.chosen_trials:
            sentences.append(self._sentence(split, best_of=True))
        left_out = [f"{r} diverged ({self.diverged(r)}) and is left out" for r in self.rows if self.diverged(r)]
        how = (f"{n} seeds, paired t-test, Holm-corrected" if n >= MIN_SEEDS else
               f"{n} seed{'s' * (n != 1)}: means only; a test needs at least {MIN_SEEDS} seeds")
        tail = f" [{split} accuracy, points, {how}]"
        best = self.best
        same_size = (f". The most accurate same-size model here, chosen on validation accuracy (a tie goes to the "
                     f"baseline, then to the first row in the table), is {best!r}")
        return " ".join(sentences) + tail + "".join(f". {x}" for x in left_out) + same_size + "."

    def _sentence(self, split: str, best_of: bool) -> str:
        deltas = self.comparisons(split, best_of)
        mine = self.chosen_trials.get("encodenet", self.default) if best_of else self.default
        who = (f"EncodeNet, best of {self.trials} on validation ({mine!r}) against each control's best of "
               f"{self.trials}," if best_of else "EncodeNet (the default recipe)" if mine == "encodenet"
               else f"EncodeNet ({mine})")
        if not deltas:
            why = ("has not finished on every seed yet" if mine not in self.records else
                   f"diverged: {self.diverged(mine)}" if self.diverged(mine) else "has no other row to compare with")
            return f"{who} {why}."
        # under MIN_SEEDS seeds the verdict's bracket says "means only" once, not after every comparison
        return f"{who} " + "; ".join(describe(d, d["p_holm"], o, seeds_note=False) for o, d in deltas.items()) + "."

    # ---- reports (report.py)
    def table(self) -> str:
        """Markdown table of every row (`report.table`)."""
        return report.table(self)

    def markdown(self) -> str:
        """results.md: the table, the verdict and the paired differences (`report.markdown`)."""
        return report.markdown(self)

    def to_dict(self) -> Dict[str, Any]:
        split = self._split(None)
        return {"rows": {r: {"what": row_what(r, self.described), "diverged": self.diverged(r),
                             "val": {**_mean_std(self.accuracy(r)), "per_seed": self.accuracy(r)},
                             "test": ({**_mean_std(self.accuracy(r, "test")), "per_seed": self.accuracy(r, "test")}
                                      if r in self.tests else None),
                             "extra_epochs": self.extra_epochs(r)} for r in self.rows},
                "deltas": {"split": split, **self.comparisons(split)},
                "deltas_best_of": ({"split": split, **self.comparisons(split, True)}
                                   if self.trials > 1 and self.chosen_trials else None),
                "verdict": self.verdict, "best": self.best, "chosen": self.chosen,
                "chosen_trials": self.chosen_trials, "trials": self.trials, "seeds": self.seeds,
                "controls": self.controls, "compute": self.compute, "config": self.config, "notes": self.notes,
                "versions": versions(), "machine": machine(),
                "records": {r: {str(s): v for s, v in by_seed.items()} for r, by_seed in self.records.items()}}

    def save(self, directory: Union[str, Path]) -> Path:
        """Write results.json (every number, config, versions, machine), results.md and accuracy_vs_compute.png."""
        return report.save(self, directory)

    def plot(self, path: Union[str, Path]) -> None:
        """The picture: each row's accuracy per seed and mean ± std (`report.plot`)."""
        report.plot(self, path)

    def model(self, row: Optional[str] = None, seed: Optional[int] = None) -> nn.Module:
        """That row's trained model (default: `best`, first seed) as a plain timm model, on CPU, eval mode."""
        row = row or self.best
        seed = self.seeds[0] if seed is None else seed
        if row not in self.records or seed not in self.records[row]:
            raise ValueError(f"no trained model for row {row!r} seed {seed}; rows: {self.rows}, seeds: {self.seeds}")
        if self.model_fn is None:
            raise ValueError("this result holds no model_fn to build the model with; pass model_fn to compare "
                             "(or set result.model_fn)")
        state = self._weights.get((row, seed))
        if state is None:
            path = None if self.out_dir is None else weights_path(self.out_dir, row, seed)
            if path is None or not path.is_file():
                raise ValueError(f"the weights of {row!r} seed {seed} were not kept ({path or 'no out_dir'})")
            state = load_file(str(path))
        seed_everything(seed)
        model = deepcopy(self.model_fn())
        model.load_state_dict(state)
        return model.cpu().eval()


# rows of comparisons written before compare named its controls as it does now
_LEGACY_NAMES = {"baseline_continued": "continued", "baseline_equal": "equal"}


def _last_accuracy(record: Dict[str, Any]) -> Optional[float]:
    hist = record.get("history")
    return hist[-1].get("accuracy") if isinstance(hist, list) and hist and isinstance(hist[-1], dict) else None


def _choose_on_val(records: Dict[str, Dict[int, Dict[str, Any]]], candidates: Sequence[str]) -> Optional[str]:
    """The candidate with the highest mean validation accuracy (diverged rows never; a tie goes to the first)."""
    ok = [r for r in candidates if r in records and not any(v.get("diverged") for v in records[r].values())]
    return max(ok, key=lambda r: np.mean([v["val_accuracy"] for v in records[r].values()])) if ok else None


def _sealed_test(sealed: Dict[str, Any], records: Dict[str, Dict[int, Dict[str, Any]]], row: str,
                 seed: int) -> Optional[float]:
    """A declared row's test accuracy from test.json (its current or its older layout), else from a record
    that measured it blind at its end; None when neither has it."""
    tested = sealed.get("test") or sealed.get("test_accuracy") or {}
    names = [row] + [old for old, new in _LEGACY_NAMES.items() if new == row]
    for name in names:
        value = (tested.get(name) or {}).get(str(seed))
        if value is not None:
            return float(value)
    value = records[row][seed].get("test_accuracy")
    return None if value is None else float(value)


def _mean_std(values: Sequence[float]) -> Dict[str, float]:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}
