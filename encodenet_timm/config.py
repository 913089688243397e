"""Configuration: the dataclasses a run is set up with, each field's meaning in the comment beside it,
and their range checks.

Every documented default is the dataclass default. Keys are dotted paths (``transfer.lr``), the
same in Python, in YAML and on the command line. What every config shares (the round trip through
YAML, dotted overrides, help text read from the comments here) is in `config_io`.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

from .config_io import ConfigBase, Strict, describe_fields

__all__ = ["StageConfig", "AutoencoderConfig", "RepresentativesConfig", "DecoderConfig", "DataConfig",
           "EncodeNetConfig", "ControlsConfig", "describe_keys"]

SPLIT_FEATURES = "features"
REPRESENTATIVE_RULES = ("min_entropy", "nearest_centroid")
AMP_VALUES = ("none", "auto", "bf16", "fp16")
FAISS_GPU_VALUES = ("auto", "never", "always")
SCAN_MODES = ("verify", "decode", "none")  # data.scan (`file_checks.scan_files` says what each catches)


@dataclass
class StageConfig(Strict):
    """One training stage (baseline, autoencoder or transfer); all run through the same loop."""
    epochs: int = 10                 # passes over the training loader; 0 skips the stage
    lr: float = 0.05                 # peak learning rate
    opt: str = "sgd"                 # any timm optimizer name (timm.optim.create_optimizer_v2)
    momentum: float = 0.9            # used by optimizers that take it (sgd, rmsprop, ...)
    weight_decay: float = 5e-4       # timm skips it on biases and norm weights
    sched: str = "cosine"            # any timm scheduler name (create_scheduler_v2), or "none"
    warmup_epochs: int = 0           # linear warm-up, part of `epochs`
    clip_grad: Optional[float] = None  # max gradient norm; None disables clipping
    smoothing: float = 0.0           # label smoothing (classification stages only)


@dataclass
class AutoencoderConfig(StageConfig):
    """The converting-autoencoder stage: a `StageConfig` plus its objective."""
    ce_weight: float = 1.0           # + ce_weight x cross-entropy of the head on the encoder's features
                                     # (0: the paper's pure MSE to the representative)


@dataclass
class RepresentativesConfig(Strict):
    """Per-class clustering of pre-logits features and the pick of each cluster's representative."""
    clusters_per_class: Union[int, str] = 5  # k per class, or "auto" (silhouette, 2..max_auto_clusters)
    max_auto_clusters: int = 10      # upper bound on k when clusters_per_class is "auto"
    niter: int = 25                  # k-means iterations (FAISS)
    nredo: int = 3                   # k-means restarts; the lowest objective is kept
    faiss_gpu: str = "auto"          # "auto" (every GPU FAISS sees, when it sees one), "never", "always"
    batch_size: int = 256            # batch size for the feature pass over the training set
    feature_store: Optional[str] = None  # directory for the (N, D) features on disk (read a class at a time:
                                     # bounded memory for ImageNet-size data); None: held in RAM. Under
                                     # torchrun every rank must see the same directory
    store_dtype: str = "float32"     # "float32" or "float16" (half the disk) for the on-disk features
    rule: str = "min_entropy"        # "min_entropy" (paper: lowest softmax entropy in the cluster) or
                                     # "nearest_centroid" (the member nearest the cluster mean, pre-logits space)

    def __post_init__(self):
        if self.store_dtype not in ("float32", "float16"):
            raise ValueError(f"config key 'representatives.store_dtype' must be 'float32' or 'float16', "
                             f"got {self.store_dtype!r}")
        if self.rule not in REPRESENTATIVE_RULES:
            raise ValueError(f"config key 'representatives.rule' must be one of {REPRESENTATIVE_RULES}, "
                             f"got {self.rule!r}")


@dataclass
class DecoderConfig(Strict):
    """The mirrored decoder built from the encoder's traced shape trail."""
    width: float = 1.0               # multiplier on the mirrored channel widths (shrunk to fit the FLOPs cap)
    min_channels: int = 8            # no decoder layer is narrower than this
    max_flops_ratio: float = 1.0     # decoder FLOPs <= this x encoder FLOPs at the input size
    norm: str = "batch"              # "batch" (BatchNorm) or "group" (GroupNorm: no batch statistics, so
                                     # a DDP run does not depend on the per-rank batch size)

    def __post_init__(self):
        if self.norm not in ("batch", "group"):
            raise ValueError(f"config key 'decoder.norm' must be 'batch' or 'group', got {self.norm!r}")


@dataclass
class DataConfig(Strict):
    """How fit checks the training (and validation) images before it spends compute on them."""
    scan: str = "verify"             # image files (ImageFolder-style datasets) checked before training:
                                     # "verify" (headers and checksums, cheap), "decode" (every file decoded), "none"
    skip_unreadable: bool = False    # leave out the files the scan finds unreadable (their count is logged and
                                     # recorded in run.json) instead of stopping with their names

    def __post_init__(self):
        if self.scan not in SCAN_MODES:
            raise ValueError(f"config key 'data.scan' must be one of {SCAN_MODES}, got {self.scan!r}")


def _stage(cls: type = StageConfig, **kw) -> Any:
    return field(default_factory=lambda: cls(**kw))


@dataclass
class EncodeNetConfig(ConfigBase):
    """Everything `EncodeNetWrapper` needs.

    The defaults are the recipe that won the validation ablation (benchmarks/results/ablation-short):
    split before the last stage, MSE + cross-entropy autoencoder, then a short fine-tune of every
    weight. `paper()` is the method exactly as published.
    """
    seed: int = 0                    # one seed for torch, data order and FAISS, in [0, 2**30]
    device: str = "auto"             # "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ...
    amp: str = "none"                # autocast dtype: "none" (fp32), "auto" (bf16 on a GPU that supports it and on a
                                     # CPU with native bf16, AMX or AVX512-BF16; else fp32), "bf16" (GPU or CPU),
                                     # "fp16" (CUDA only, with a GradScaler). On a CPU bf16 is not faster
                                     # for every model (resnet10t at 32 px: 0.89x): time yours first
    channels_last: bool = False      # NHWC memory format (faster on many CPUs and GPUs)
    compile: bool = False            # torch.compile the trainable module of every training stage
    input_size: Optional[Tuple[int, int, int]] = None  # the model's input (C, H, W); None: the model's, then the data's
    progress: bool = True            # tqdm bar per epoch
    split: str = "last_stage"        # "features" (paper: forward_features | forward_head); "last_stage" (before
                                     # the last feature_info stage); or a stage module named in the model's
                                     # feature_info ("layer3", "stages.2"): the modules after it restart from
                                     # the baseline's weights and are retrained with the head in transfer
    data: DataConfig = field(default_factory=DataConfig)  # checks of the image files before training
    baseline: StageConfig = _stage(epochs=0)  # 0: the model passed in is already trained
    representatives: RepresentativesConfig = field(default_factory=RepresentativesConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    autoencoder: AutoencoderConfig = _stage(AutoencoderConfig, epochs=10, lr=1e-3, opt="adamw", weight_decay=0.0)
    transfer: StageConfig = _stage(epochs=10, lr=0.01)
    finetune: StageConfig = _stage(epochs=5, lr=0.01)  # after transfer: every weight trained at a low lr
                                                       # (0 epochs: skipped, as in the paper)

    def __post_init__(self):
        check_ranges(self)

    @classmethod
    def paper(cls, **overrides: Any) -> "EncodeNetConfig":
        """The method exactly as the paper describes it: split at forward_features, 5 clusters per class,
        lowest-entropy representatives, pure-MSE autoencoder, frozen encoder, no final fine-tune.

        `overrides` are dotted keys (``paper(**{"transfer.epochs": 5})``) or top-level fields.
        """
        base = cls()
        paper = {"split": SPLIT_FEATURES, "representatives.clusters_per_class": 5,
                 "representatives.rule": "min_entropy", "autoencoder.ce_weight": 0.0,
                 "autoencoder.epochs": 10, "autoencoder.lr": 1e-3, "transfer.epochs": 10, "transfer.lr": 0.01,
                 "finetune.epochs": 0}
        paper.update(overrides)
        return base.override(paper)

    @property
    def baseline_epochs(self) -> int:
        """Shorthand for ``baseline.epochs`` (0: no baseline training in `fit`)."""
        return self.baseline.epochs

    @baseline_epochs.setter
    def baseline_epochs(self, value: int) -> None:
        self.baseline.epochs = value

@dataclass
class ControlsConfig(ConfigBase):
    """How `compare` trains its same-size controls, apart from the recipe's stages.

    continued, ema and kd restart training from a converged baseline: a low restart lr with a linear
    warm-up and gradient clipping (a fresh optimizer's first steps on a converged model are its
    riskiest). equal trains from scratch with the baseline's own schedule (``config.baseline``).
    The lr is the default of a grid: ``compare(trials=k)`` gives each control its best of k lrs
    (``lr x`` `trial_factors`), chosen on validation, as EncodeNet gets its best of k.
    """
    lr: float = 0.003                # peak lr of continued, ema and kd (restart from the trained baseline)
    opt: str = "sgd"                 # any timm optimizer name
    momentum: float = 0.9            # used by optimizers that take it
    weight_decay: float = 5e-4       # timm skips it on biases and norm weights
    sched: str = "cosine"            # any timm scheduler name, or "none"
    warmup_epochs: int = 1           # linear warm-up from ~0 to lr, part of the budget
    clip_grad: Optional[float] = 2.0  # max gradient norm; null disables clipping
    smoothing: float = 0.0           # label smoothing
    ema_decay: float = 0.9998        # the ema control's ModelEmaV3 decay (with warm-up)
    kd_temperature: float = 4.0      # timm LogitDistillationTask temperature (teacher = the baseline in eval
                                     # mode, as timm's train.py runs it; the student's BatchNorm: kd_student_bn)
    kd_task_loss_weight: float = 0.3  # weight of the cross-entropy; the KL term gets 1 - this
    kd_student_bn: str = "eval"      # the student's BatchNorm: "eval" (the baseline's running statistics, frozen,
                                     # as the teacher's: chosen on validation, see docs/compare.md) or "train"
                                     # (batch statistics, as timm's train.py)

    def __post_init__(self):
        for key in ("lr", "kd_temperature", "ema_decay"):
            if not getattr(self, key) > 0:
                _fail(f"controls.{key}", "> 0", getattr(self, key))
        if not 0 <= self.kd_task_loss_weight <= 1:
            _fail("controls.kd_task_loss_weight", "in [0, 1]", self.kd_task_loss_weight)
        if self.kd_student_bn not in ("train", "eval"):
            _fail("controls.kd_student_bn", "'train' or 'eval'", self.kd_student_bn)
        if not self.ema_decay < 1:
            _fail("controls.ema_decay", "< 1", self.ema_decay)
        if self.warmup_epochs < 0 or (self.clip_grad is not None and self.clip_grad <= 0):
            _fail("controls.warmup_epochs / clip_grad", ">= 0 / > 0 or null", (self.warmup_epochs, self.clip_grad))

    def stage(self, epochs: int, lr_factor: float = 1.0) -> StageConfig:
        """The control's training as a `StageConfig` of `epochs` epochs, its lr scaled by `lr_factor`."""
        return StageConfig(epochs=epochs, lr=self.lr * lr_factor, opt=self.opt, momentum=self.momentum,
                           weight_decay=self.weight_decay, sched=self.sched,
                           warmup_epochs=min(self.warmup_epochs, max(epochs - 1, 0)), clip_grad=self.clip_grad,
                           smoothing=self.smoothing)


def describe_keys(config: Optional[Any] = None, prefix: str = "") -> Dict[str, str]:
    """Dotted key -> one line on it: the comment beside its field in this file (its meaning and allowed
    values), the type it takes and its default in `config` (default: ``EncodeNetConfig()``); e.g.
    ``"transfer.lr"`` -> "peak learning rate (a number; default 0.01)". The CLI's ``--help`` lists these,
    so a key's words live in one place (read by `config_io.describe_fields`)."""
    return describe_fields(EncodeNetConfig() if config is None else config, prefix)


def _fail(key: str, rule: str, value: Any) -> None:
    raise ValueError(f"config key {key!r} must be {rule}, got {value!r}")


def check_ranges(cfg: "EncodeNetConfig") -> None:
    """Raise ValueError naming the dotted key of the first value out of its range (no torch, no timm:
    optimizer and scheduler names are checked against timm's registries by `checks.check_config`)."""
    if not 0 <= cfg.seed <= 2 ** 30:  # NumPy needs >= 0; FAISS takes seed + class index as a C int
        _fail("seed", "an int in [0, 2**30]", cfg.seed)
    if cfg.amp not in AMP_VALUES:
        _fail("amp", f"one of {AMP_VALUES}", cfg.amp)
    if cfg.input_size is not None and any(v < 1 for v in cfg.input_size):
        _fail("input_size", "(C, H, W) with every entry >= 1, or null", cfg.input_size)
    stages = {name: getattr(cfg, name) for name in ("baseline", "autoencoder", "transfer", "finetune")}
    for name, st in stages.items():
        if not isinstance(st, StageConfig):
            _fail(name, "a StageConfig", st)
        if st.epochs < 0:
            _fail(f"{name}.epochs", ">= 0 (0 skips the stage)", st.epochs)
        if not (st.lr > 0 and math.isfinite(st.lr)):
            _fail(f"{name}.lr", "a finite number > 0", st.lr)
        if st.momentum < 0:
            _fail(f"{name}.momentum", ">= 0", st.momentum)
        if st.weight_decay < 0:
            _fail(f"{name}.weight_decay", ">= 0", st.weight_decay)
        if st.warmup_epochs < 0 or (st.epochs > 0 and st.warmup_epochs > st.epochs):
            _fail(f"{name}.warmup_epochs", f"in [0, {name}.epochs={st.epochs}] (warm-up is part of the epochs)",
                  st.warmup_epochs)
        if st.clip_grad is not None and not st.clip_grad > 0:
            _fail(f"{name}.clip_grad", "> 0, or null to disable clipping", st.clip_grad)
        if not 0.0 <= st.smoothing < 1.0:
            _fail(f"{name}.smoothing", "in [0, 1)", st.smoothing)
    if cfg.autoencoder.ce_weight < 0:
        _fail("autoencoder.ce_weight", ">= 0 (0: the paper's pure MSE)", cfg.autoencoder.ce_weight)
    r = cfg.representatives
    k = r.clusters_per_class
    if k != "auto" and not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        _fail("representatives.clusters_per_class", "an int >= 1 or 'auto'", k)
    for key, low in (("max_auto_clusters", 2), ("niter", 1), ("nredo", 1), ("batch_size", 1)):
        if getattr(r, key) < low:
            _fail(f"representatives.{key}", f">= {low}", getattr(r, key))
    if r.faiss_gpu not in FAISS_GPU_VALUES:
        _fail("representatives.faiss_gpu", f"one of {FAISS_GPU_VALUES}", r.faiss_gpu)
    d = cfg.decoder
    if not d.width > 0:
        _fail("decoder.width", "> 0", d.width)
    if d.min_channels < 1:
        _fail("decoder.min_channels", ">= 1", d.min_channels)
    if not d.max_flops_ratio > 0:
        _fail("decoder.max_flops_ratio", "> 0", d.max_flops_ratio)
