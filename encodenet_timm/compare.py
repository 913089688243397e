"""Will EncodeNet help *this* model? The recipe against same-size controls at equal extra compute.

    result = compare(lambda: timm.create_model("resnet20_cifar", num_classes=10), train_loader, val_loader,
                     test_loader=test_loader, seeds=(0, 1, 2))
    print(result.table()); print(result.verdict)
    model = result.model()            # the best row's weights as a plain timm model

Rows, per seed (each a model of the baseline's architecture and size):

* ``baseline``: trained here when ``config.baseline.epochs > 0``; otherwise the model `model_fn` returns
  *is* the trained baseline and the seeds vary only what comes after it.
* ``encodenet``: `EncodeNetWrapper.fit` from the baseline with `config` (and one row per entry of `variants`).
* the controls (`encodenet_timm.controls`), each given the recipe's extra compute X (its FLOPs counted
  with `FlopCounterMode` on the real stage code, in supervised epochs; `count_compute`): ``continued``,
  ``ema``, ``kd`` (restarted from the baseline with `ControlsConfig`'s schedule) and ``equal`` (from
  scratch, baseline + X epochs; only when the baseline is trained here).

An equal tuning budget: with ``trials=k`` EncodeNet gets k settings (every stage's lr x 1, 1/3, 3, ...) and
so does each of continued, ema and kd (its lr x the same factors); each side's best is chosen on validation.
Validation chooses everything; the test set is evaluated once, after the choice, and only for the rows
declared before it (`result.declared_rows`); it is written to ``test.json`` apart from the runs.
A row whose training diverges (`controls.divergence`) is marked and left out of the verdict. A baseline
that looks untrained (validation accuracy near chance) is refused unless ``allow_untrained_baseline``.
"""
import logging
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Union

import torch.nn as nn
from torch.utils.data import DataLoader

from . import distributed
from .checks import check_data, check_loader
from .compute import count_compute
from .config import ControlsConfig, EncodeNetConfig
from .env import precision
from .errors import RunDirInUseError
from .files import DirLock, read_json, write_json
from .loaders import readable
from .result import CompareResult, _choose_on_val
from .row_names import CONTROLS, TRIAL_FACTORS, base_row, declared_rows, ordered_rows, trial_name
from .rows import Rows
from .split import check_timm_classifier
from .stats import paired_difference
from .stopping import StopSignals
from .training import evaluate
from .wrapper import EncodeNetWrapper

__all__ = ["compare", "count_compute", "paired_difference", "CompareResult", "CONTROLS", "UNTRAINED_MARGIN"]

_logger = logging.getLogger(__name__)

UNTRAINED_MARGIN = 0.05  # a baseline within this much of chance accuracy (1 / num_classes) is refused


@contextmanager
def _seed_lock(out: Optional[Path], seed: int, todo: Sequence[str]) -> Iterator[None]:
    """Hold ``out/locks/seed<k>`` while a seed's unfinished rows train: processes given other seeds share
    `out`, a second process on the same seed is refused. A seed with nothing to train takes no lock."""
    if out is None or not todo:
        yield
        return
    lock = DirLock(out / "locks" / f"seed{seed}")
    try:
        lock.acquire()
    except RunDirInUseError as e:
        raise RunDirInUseError(f"seed {seed} of {out} is being trained by another process ({e}); give this "
                               f"process other seeds, or wait for that one to end") from None
    try:
        yield
    finally:
        lock.release()


def _check_trained(runner: Rows, seed: int, allow: bool) -> None:
    """Refuse a baseline whose validation accuracy is within `UNTRAINED_MARGIN` of chance."""
    acc = runner.records["baseline"][seed]["val_accuracy"]
    chance = 1.0 / runner.common["num_classes"]
    if acc < chance + UNTRAINED_MARGIN and allow:
        _logger.warning("compare: the baseline of seed %d scores %.1f%% on validation, within %.0f points of chance "
                        "(%.1f%%): compared anyway (allow_untrained_baseline)", seed, 100 * acc,
                        100 * UNTRAINED_MARGIN, 100 * chance)
    elif acc < chance + UNTRAINED_MARGIN:
        raise ValueError(f"the baseline of seed {seed} scores {100 * acc:.1f}% on validation, within "
                         f"{100 * UNTRAINED_MARGIN:.0f} points of chance ({100 * chance:.1f}%): it looks untrained, "
                         f"so every row would be compared from noise. Train it (config.baseline.epochs > 0, CLI "
                         f"--baseline.epochs N), pass a model_fn that returns the trained model, or pass "
                         f"allow_untrained_baseline=True (CLI --allow-untrained-baseline) if this is intended")


def _run_seed(runner: Rows, seed: int, rows: Sequence[str], allow_untrained: bool) -> None:
    """Every row of `rows` for `seed` not finished yet (a record another process wrote counts as finished)."""
    finished = [r for r in rows if runner.done(r, seed)]
    todo = [r for r in rows if r not in finished]
    if todo:
        _logger.info("compare: seed %d: %s%s", seed, f"kept (finished before): {', '.join(finished)}; " if finished
                     else "", f"to train: {', '.join(todo)}")
    if "baseline" in todo:
        runner.baseline(seed)
    if runner.done("baseline", seed):
        _check_trained(runner, seed, allow_untrained)
    for row in todo:
        kind, trial = base_row(row)
        if runner.done(row, seed) or kind == "baseline":
            continue
        if row in runner.recipes:
            runner.encodenet(row, seed)
        elif kind in ("continued", "ema"):
            runner.continued(seed, trial, [r for r in (trial_name("continued", trial), trial_name("ema", trial))
                                           if r in todo])
        elif kind == "kd":
            runner.kd(seed, trial)
        elif kind == "equal":
            runner.equal(seed)


def _test_rows(runner: Rows, test_loader: DataLoader, rows: Sequence[str], seeds: Sequence[int],
               out: Optional[Path], choice: Dict[str, Any]) -> Dict[str, Dict[int, float]]:
    """Test accuracy of the declared `rows`, once, after the choice: read from ``test.json`` when it holds
    them for the same choice, from a record that measured it blind at its end (records written before the
    test was sealed), or evaluated now from the row's weights; written to ``test.json``."""
    path = out / "test.json" if out is not None else None
    saved = read_json(path) if path is not None and path.is_file() else {}
    same = saved.get("choice") == choice
    tests: Dict[str, Dict[int, float]] = {}
    for row in rows:
        tests[row] = {}
        for seed in seeds:
            old = (saved.get("test", {}).get(row, {}) if same else {}).get(str(seed))
            legacy = runner.records[row][seed].get("test_accuracy")
            if old is None and legacy is None:
                model = runner.load(row, seed)
                old = evaluate(model, test_loader, runner.device, channels_last=runner.config.channels_last,
                               amp=runner.config.amp)["accuracy"]
            tests[row][seed] = float(old if old is not None else legacy)
    if path is not None:
        write_json(path, {"choice": choice, "rule": "validation chooses; these rows were declared before the choice "
                          "and their test accuracy read once, after it", "seeds": list(seeds),
                          "test": {r: {str(s): v for s, v in by_seed.items()} for r, by_seed in tests.items()}})
    return tests


def compare(model_fn: Callable[[], nn.Module], train_loader: DataLoader, val_loader: DataLoader, *,
            config: Optional[EncodeNetConfig] = None, controls: Sequence[str] = CONTROLS,
            seeds: Sequence[int] = (0, 1, 2), plain_loader: Optional[DataLoader] = None,
            test_loader: Optional[DataLoader] = None, out_dir: Optional[Union[str, Path]] = None,
            variants: Optional[Mapping[str, EncodeNetConfig]] = None,
            controls_config: Optional[ControlsConfig] = None, trials: int = 1, checkpoint_every: int = 0,
            rows: Optional[Sequence[str]] = None, allow_untrained_baseline: bool = False,
            described: Optional[Mapping[str, str]] = None) -> CompareResult:
    """Train the baseline, EncodeNet and same-size controls at equal extra compute, per seed, and compare.

    Args:
        model_fn: returns a fresh timm classifier; called after seeding with each seed. With
            ``config.baseline.epochs == 0`` it must return the *trained* baseline.
        train_loader: (images, labels) over a map-style dataset, may augment; every row trains on it.
        val_loader: every row is evaluated on it once, at its end; every choice is made on it.
        config: the EncodeNet recipe (``EncodeNetConfig()`` when None); its ``seed`` is replaced per seed.
        controls: any of ``("continued", "kd", "ema", "equal")``.
        seeds: one full set of rows per seed; a verdict needs at least 3 (`encodenet_timm.stats`).
        plain_loader: the training set without augmentation (EncodeNet's feature pass), as in `fit`.
        test_loader: evaluated once, after the choice, for the declared rows only (`result.declared_rows`).
        out_dir: each finished (row, seed) is written there (runs/*.json, weights/*.safetensors) and skipped
            when compare runs again with the same settings; a row in progress checkpoints under
            checkpoints/ (every `checkpoint_every` steps and every epoch) and continues from there;
            compute.json holds the counted FLOPs, test.json the sealed test. SIGTERM or SIGINT then finishes
            the step, writes the row's checkpoint and raises `Interrupted` (compare again to continue).
        variants: more EncodeNet rows, name -> config (e.g. an ablation); each is counted for its own compute.
        controls_config: how continued, ema and kd are trained (`ControlsConfig`; its defaults when None).
        trials: validation trials per side: EncodeNet's stage lrs and each restarted control's lr times
            1, 1/3, 3, 1/9, 9 (the first `trials`); each side's best is chosen on validation.
        checkpoint_every: optimizer steps between checkpoints inside a row (with `out_dir`; 0: epoch ends only).
        rows: train only these rows now (names as in the table, e.g. ``["baseline"]``; their seed's baseline
            too; ``[]`` trains nothing); the rows that finished before are reported, and the test waits until
            every row has finished.
        allow_untrained_baseline: compare from a baseline at chance accuracy instead of refusing it.
        described: row -> what it is, for the table (variants).

    Raises:
        ValueError: an unknown control, no seeds, a variant named like a row, settings that differ from the
            ones `out_dir` was made with, an untrained-looking baseline, or bad data (`EncodeNetWrapper.fit`'s
            checks).
        TypeError: `model_fn` does not return a timm classifier, or a loader is not a DataLoader.
    """
    config = EncodeNetConfig() if config is None else config
    if not isinstance(config, EncodeNetConfig):
        raise TypeError(f"config must be an EncodeNetConfig, got {type(config).__name__}")
    controls_config = ControlsConfig() if controls_config is None else controls_config
    if not isinstance(controls_config, ControlsConfig):
        raise TypeError(f"controls_config must be a ControlsConfig, got {type(controls_config).__name__}")
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise ValueError(f"unknown controls {unknown}; choose from {', '.join(CONTROLS)}")
    controls = [c for c in CONTROLS if c in controls]  # one order, whatever order they were given in
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise ValueError("seeds is empty: give at least one (three or more for a verdict)")
    if isinstance(trials, bool) or not isinstance(trials, int) or not 1 <= trials <= len(TRIAL_FACTORS):
        raise ValueError(f"trials must be an int from 1 to {len(TRIAL_FACTORS)}, got {trials!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be an int >= 0 (0: at epoch ends only), got {checkpoint_every!r}")
    variants = dict(variants or {})
    clash = [v for v in variants if base_row(v)[0] in ("baseline", "encodenet", *CONTROLS) or "@" in v]
    if clash:
        raise ValueError(f"variant names {clash} are taken by compare's own rows (or hold '@'); rename them")
    if distributed.is_distributed():
        raise ValueError("compare runs in one process: launch it without torchrun (fit runs under torchrun)")
    check_loader(train_loader, "train_loader", map_style=True)
    check_loader(val_loader, "val_loader")
    for name, loader in (("plain_loader", plain_loader), ("test_loader", test_loader)):
        if loader is not None:
            check_loader(loader, name)
    notes = []
    if "equal" in controls and config.baseline.epochs == 0:
        controls.remove("equal")
        notes.append("equal was left out: the baseline came trained (config.baseline.epochs == 0), so there is no "
                     "baseline schedule to lengthen")
        _logger.warning("compare: %s", notes[-1])
    recipes = {trial_name("encodenet", t): config.override(
        {f"{s}.lr": getattr(config, s).lr * TRIAL_FACTORS[t] for s in ("autoencoder", "transfer", "finetune")})
        for t in range(trials)}
    recipes.update(variants)
    all_rows = ordered_rows(["baseline", *recipes] + [trial_name(c, t) for c in controls
                                                      for t in range(1 if c == "equal" else trials)], list(variants))
    unknown_rows = [r for r in (rows or ()) if r not in all_rows]
    if unknown_rows:
        raise ValueError(f"rows {unknown_rows} are not rows of this comparison ({', '.join(all_rows)})")
    probe = check_timm_classifier(model_fn())
    w = EncodeNetWrapper(probe, config)  # fit's bad-data checks, before any training
    train_loader, val_loader, plain_loader, _ = readable(  # image files named (or left out) before any row
        train_loader, val_loader, plain_loader, scan=config.data.scan, skip=config.data.skip_unreadable)
    check_data(train_loader, w.model, w.device, in_chans=w.input_size[0],
               clusters_per_class=config.representatives.clusters_per_class)
    out = Path(out_dir) if out_dir is not None else None
    compute_path = out / "compute.json" if out is not None else None
    if compute_path is not None and compute_path.is_file():
        compute = read_json(compute_path)
    else:
        _logger.info("compare: counting each stage's FLOPs on one batch (nothing is trained)")
        compute = count_compute(probe, config, train_loader, kd_temperature=controls_config.kd_temperature,
                                kd_task_loss_weight=controls_config.kd_task_loss_weight)
        compute["variants"] = {name: count_compute(probe, cfg, train_loader)["extra_epochs"]
                               for name, cfg in variants.items()}
        if compute_path is not None:
            write_json(compute_path, compute)
    compute.setdefault("variants", {})
    _logger.info("compare: EncodeNet's extra compute is %.2f supervised epochs; each control gets the same",
                 compute["extra_epochs"])
    device = distributed.training_device(config.device, config.amp)  # as the wrapper's (torchrun: this rank's)
    common = {"model": type(probe).__name__, "params": int(sum(p.numel() for p in probe.parameters())),
              "num_classes": int(probe.num_classes),
              "data": {"train": len(train_loader.dataset), "val": len(val_loader.dataset)},
              "precision": precision(device, config.amp), "channels_last": config.channels_last}
    # with out_dir, SIGTERM/SIGINT finish the step, checkpoint the row and raise Interrupted (fit's own
    # handlers take over inside an EncodeNet row)
    stop = StopSignals() if out is not None else None
    runner = Rows(model_fn, train_loader, val_loader, config, controls_config, plain_loader=plain_loader,
                   out_dir=out, compute=compute, common=common, recipes=recipes, checkpoint_every=checkpoint_every,
                   stop=stop)
    # every row needs its seed's baseline: it trains first whenever another row is asked for
    training = all_rows if rows is None else [r for r in all_rows if r in rows or (r == "baseline" and rows)]
    with stop if stop is not None else nullcontext():
        for seed in seeds:
            with _seed_lock(out, seed, todo=[r for r in training if not runner.done(r, seed)]):
                _run_seed(runner, seed, training, allow_untrained_baseline)
    finished = [r for r in all_rows if all(runner.done(r, s) for s in seeds)]
    if len(finished) < len(all_rows):
        notes.append(f"partial: {', '.join(r for r in all_rows if r not in finished)} not trained yet on every seed "
                     f"{seeds}; no test until they are")
    records = {r: {s: runner.records[r][s] for s in seeds} for r in finished}
    chosen = _choose_on_val(records, list(recipes))
    chosen_trials = {c: _choose_on_val(records, [trial_name(c, t) for t in range(trials)]) for c in ("encodenet", *controls)
                     if c != "equal" and trials > 1}
    chosen_trials = {c: r for c, r in chosen_trials.items() if r is not None}
    tests = {}
    if test_loader is not None and len(finished) == len(all_rows):
        declared = declared_rows(finished, chosen, chosen_trials)
        tests = _test_rows(runner, test_loader, declared, seeds, out,
                           {"chosen": chosen, "chosen_trials": chosen_trials, "declared": declared})
    return CompareResult(records=records, compute=compute, seeds=seeds, controls=controls, config=config.to_dict(),
                         notes=notes, tests=tests, chosen=chosen, chosen_trials=chosen_trials, trials=trials,
                         described=dict(described or {}), model_fn=model_fn, out_dir=out, _weights=runner.weights)
