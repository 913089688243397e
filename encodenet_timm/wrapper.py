"""EncodeNetWrapper: the EncodeNet stages, in order, as plain code.

baseline (optional) -> representatives -> converting autoencoder -> transfer -> finetune (optional) -> export.
"""
import logging
import time
from copy import deepcopy as _deepcopy
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.task import ClassificationTask
from torch.utils.data import DataLoader, Dataset

from . import distributed
from .checkpoint import Checkpoint, load_model_file
from .checks import batch_checker, built_with, check_batch, check_built_keys, check_loader, checked_config
from .config import EncodeNetConfig
from .decoder import MirroredDecoder, build_decoder, size_for_data
from .export import export_timm, plain_model
from .files import load_state_into
from .loaders import fit_inputs, make_loader, named_reads
from .representatives import Representatives, select_representatives
from .run import Run, load_parts, run_facts
from .seeding import seed_everything
from .split import Encoder, Head, check_timm_classifier, model_input_size, modules_after, split_model
from .tasks import (ClusterTargets, ConvertingAutoencoder, ConvertingAutoencoderTask, reconstruct_images,
                    restore_modules, snapshot_modules, transfer_module)
from .training import LoopOptions, TrainState, evaluate, train_stage

__all__ = ["EncodeNetWrapper"]

_logger = logging.getLogger(__name__)

# offsets keep each stage's random stream distinct but fixed by the one config seed
_SEED_OFFSET = {"baseline": 0, "representatives": 1, "autoencoder": 2, "transfer": 3, "finetune": 4}
# what a run directory checkpoints, in order; "initial" is the model as passed in
RUN_STAGES = ("initial", "baseline", "representatives", "autoencoder", "transfer", "finetune")


class EncodeNetWrapper:
    """Apply EncodeNet to a timm classifier.

    The wrapper works on a copy of `model` (pass ``copy=False`` to train it in place). `encoder` and
    `head` are views of that copy: every parameter belongs to exactly one of them, and
    ``head(encoder(x)) == model(x)``. `export()` returns the result as a plain timm model.

    Args:
        model: a timm classifier (``timm.create_model(name, num_classes=N)``).
        config: `EncodeNetConfig`; defaults when None.
        copy: work on a deep copy of `model` (default) rather than on `model` itself.
    """

    def __init__(self, model: nn.Module, config: Optional[EncodeNetConfig] = None, *, copy: bool = True):
        check_timm_classifier(model)
        config = self.config = checked_config(EncodeNetConfig() if config is None else config)  # a validated copy
        self._built = built_with(config)  # what __init__ and the decoder read: fixed for the wrapper's life
        self._decoder_config = _deepcopy(config.decoder)
        self.device = distributed.training_device(config.device, config.amp)
        self.model = (_deepcopy(model) if copy else model).to(self.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.num_classes: int = self.model.num_classes
        self.input_size: Tuple[int, int, int] = tuple(config.input_size or model_input_size(self.model))
        enc_names, head_names = split_model(self.model, self.input_size)
        self.encoder = Encoder(self.model, enc_names)
        self.head = Head(self.model, head_names)
        # split inside forward_features: these encoder modules restart from the baseline's weights and are
        # retrained with the head in transfer (empty for the paper's split="features")
        self.after_split: List[str] = modules_after(self.model, config.split, self.input_size)
        self._after_split_snapshot: Optional[Dict[str, torch.Tensor]] = None
        self._decoder: Optional[MirroredDecoder] = None
        self._decoder_trained = False
        self.representatives: Optional[Representatives] = None
        self.history: Dict[str, Any] = {}
        self._run = Run()  # the run directory's lifecycle while fit(run_dir=...) runs; does nothing otherwise
        # the training set without augmentation that the representatives index (fit: less unreadable files)
        self.plain_dataset: Optional[Dataset] = None
        self._checkpoint_every = 0  # fit(checkpoint_every=...): optimizer steps between checkpoints in an epoch

    # ---- parts -------------------------------------------------------------------------------------
    @property
    def decoder(self) -> MirroredDecoder:
        """The mirrored decoder, built on first use at `input_size`."""
        if self._decoder is None:
            self._decoder = build_decoder(self.model, self.input_size, self._decoder_config).to(self.device)
        return self._decoder

    def _match_input_size(self, x: torch.Tensor) -> None:
        """Rebuild the (still untrained) decoder at the data's size where it differs (`decoder.size_for_data`)."""
        size = size_for_data(x, self.input_size, self.config.input_size, trained=self._decoder_trained)
        if size is not None:
            self.input_size, self._decoder = size, None

    def flops(self) -> Dict[str, float]:
        """FLOPs of one image through encoder and decoder at `input_size`, and their ratio."""
        d = self.decoder
        return {"encoder": d.encoder_flops, "decoder": d.flops, "ratio": d.flops / d.encoder_flops}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of the wrapped model for images (B, C, H, W), on x's device."""
        return self.model(x.to(self.device)).to(x.device)

    def _check(self, image_size: Optional[Tuple[int, int]] = None, labels: bool = True):
        return batch_checker(self.num_classes, self.input_size[0], image_size=image_size, labels=labels)

    def _settings(self) -> EncodeNetConfig:
        """A checked copy of `config` (`checked_config`): a value set by hand on wrapper.config since __init__ is
        checked too, and a change to a key the wrapper was built with is refused (`check_built_keys`)."""
        c = checked_config(self.config)
        check_built_keys(self._built, c, self.device)
        return c

    def _train(self, task: nn.Module, loader: DataLoader, stage: str, **kwargs: Any) -> List[Dict[str, float]]:
        """`train_stage` with the run's options, seed, resume state, checkpoints and stop requests."""
        c = self._settings()
        cfg = getattr(c, stage)
        options = LoopOptions(self.device, amp=c.amp, channels_last=c.channels_last, progress=c.progress,
                              compile=c.compile)
        with self._run.deferred():  # SIGTERM/SIGINT: the loop finishes its step and checkpoints first
            return train_stage(task, loader, cfg, stage=stage, options=options, seed=c.seed + _SEED_OFFSET[stage],
                               resume=self._run.resume_state(stage), stop=self._run.stop,
                               on_checkpoint=lambda state: self._checkpoint(stage, state.epoch, cfg.epochs, state),
                               checkpoint_every=self._checkpoint_every, **kwargs)

    def _val_fn(self, val_loader: Optional[DataLoader]):
        if val_loader is None:
            return None
        check_loader(val_loader, "val_loader")
        return lambda: self.evaluate(val_loader)

    # ---- stages ------------------------------------------------------------------------------------
    def fit(self, train_loader: DataLoader, val_loader: Optional[DataLoader] = None, *,
            plain_loader: Optional[DataLoader] = None, run_dir: Optional[Union[str, Path]] = None,
            resume: bool = False, checkpoint_every: int = 0) -> Dict[str, Any]:
        """Run every stage: baseline (if ``config.baseline.epochs > 0``) -> representatives ->
        autoencoder -> transfer -> finetune (if ``config.finetune.epochs > 0``).

        Args:
            train_loader: (images (B, C, H, W), labels (B,)) over a map-style dataset; may augment.
            val_loader: optional, evaluated after every epoch of the classification stages.
            plain_loader: the training set without random augmentation, same order and length as
                `train_loader`'s dataset, for the feature pass and the representative images;
                `train_loader` is used when None.
            run_dir: write config.yaml, run.json, a checkpoint at every epoch end and, at the end,
                model.safetensors there (layout: `encodenet_timm.run_dir`). While the stages run,
                SIGTERM and SIGINT stop the run: the current training step is finished, a checkpoint
                written and `Interrupted` raised (the handlers before fit are put back afterwards).
            resume: continue the run in `run_dir` from its last complete checkpoint.
            checkpoint_every: with `run_dir`, also write a checkpoint every N optimizer steps inside an
                epoch (the newest complete checkpoint is kept); a resume continues at the next batch
                with the result of an uninterrupted run. 0: at epoch ends only. Not part of the config:
                a resume may change it.

        Returns:
            The history: per stage, a list of per-epoch dicts (loss, accuracy where defined, seconds, ...).

        Raises:
            ValueError: bad data (checked before any training), or a `run_dir` that cannot be used
                (see `RunDir.begin`).
            RunDirInUseError: another process is writing `run_dir`.
            DataError: an image file that cannot be read (named, with its index: before training where
                ``config.data.scan`` finds it, else at its first read), or, on resume, training data
                that differs from the run's (size, class counts, label order, files).
            Interrupted: SIGTERM or SIGINT (with `run_dir`); the run directory says "interrupted" and
                how to resume.
            RankLostError: under torchrun, another rank died or stopped answering.
        """
        self._settings()  # before any stage: a value set by hand on wrapper.config since __init__
        train_loader, val_loader, plain_loader, skipped = fit_inputs(
            train_loader, val_loader, plain_loader, config=self.config, model=self.model, device=self.device,
            in_chans=self.input_size[0], run_dir=run_dir, resume=resume, checkpoint_every=checkpoint_every)
        self.plain_dataset = (plain_loader or train_loader).dataset  # the plots' images
        c = self.config
        plan = (("baseline", c.baseline.epochs > 0, lambda: self.fit_baseline(train_loader, val_loader)),
                ("representatives", True, lambda: self.select_representatives(plain_loader or train_loader)),
                ("autoencoder", True, lambda: self.fit_autoencoder(train_loader, self.representatives)),
                ("transfer", True, lambda: self.fit_transfer(train_loader, val_loader)),
                ("finetune", c.finetune.epochs > 0, lambda: self.fit_finetune(train_loader, val_loader)))
        # under torchrun rank 0 writes the run directory, every rank reads it to resume
        run = self._run = Run.begin(run_dir, RUN_STAGES, c.to_dict(),
                                    lambda: run_facts(self.model, train_loader.dataset, skipped, seed=c.seed,
                                                      device=self.device, amp=c.amp), resume=resume)
        self._checkpoint_every = checkpoint_every if run_dir is not None else 0
        try:  # the run directory stays locked until fit returns or raises
            if resume:
                self._restore(self._run.latest())
            elif run_dir is not None:
                self._checkpoint("initial", 0, 0)
            run.run_stages(plan)
            self._run = Run()
            run.finish(lambda: self.export().state_dict())
        finally:
            self._run, self._checkpoint_every = Run(), 0
            run.close()
        distributed.barrier()  # the other ranks return once the run directory is complete
        return self.history

    def _checkpoint(self, stage: str, epoch: int, epochs: int, train: Optional[TrainState] = None) -> None:
        """Write `stage`'s checkpoint after `epoch` of its `epochs` (nothing outside fit(run_dir=...))."""
        self._run.save_parts(stage, epoch, epochs, model=self.model, decoder=self._decoder,
                             tail=self._after_split_snapshot, representatives=self.representatives,
                             history=self.history, input_size=self.input_size,
                             decoder_trained=self._decoder_trained, train=train)

    def _restore(self, ckpt: Checkpoint) -> None:
        """Load the wrapper's parts from a run's checkpoint (`Run.latest`; `run.load_parts`), then continue the
        run from it."""
        parts = load_parts(ckpt, self.model, self.device)
        self.history, self.input_size, self._decoder_trained = parts.history, parts.input_size, parts.decoder_trained
        if parts.decoder is not None:
            self._decoder = None  # rebuilt at the checkpoint's input size
            load_state_into(self.decoder, parts.decoder, str(ckpt.directory))
        if parts.representatives is not None:
            self.representatives = parts.representatives
        if parts.tail is not None:
            self._after_split_snapshot = parts.tail
        self._run.continue_from(ckpt)

    def fit_baseline(self, train_loader: DataLoader, val_loader: Optional[DataLoader] = None) -> List[Dict]:
        """Ordinary supervised training of the whole model (``config.baseline``)."""
        return self._fit_whole_model("baseline", train_loader, val_loader)

    def _fit_whole_model(self, stage: str, train_loader: DataLoader,
                         val_loader: Optional[DataLoader]) -> List[Dict]:
        """Supervised training of every weight with ``config.<stage>`` (baseline and finetune)."""
        check_loader(train_loader, "train_loader")
        cfg = getattr(self.config, stage)
        if cfg.epochs == 0:  # called by hand: say so rather than return [] having trained nothing
            self._check()(*next(iter(train_loader))[:2])  # bad data is still named first
            raise ValueError(f"fit_{stage} trains nothing: config.{stage}.epochs is 0 (set it, e.g. "
                             f"EncodeNetConfig().override({{'{stage}.epochs': 10}}))")
        seed_everything(self.config.seed + _SEED_OFFSET[stage])
        self.model.requires_grad_(True)
        task = ClassificationTask(self.model, criterion_kwargs=dict(smoothing=cfg.smoothing),
                                  device=self.device, verbose=False)
        hist = self._train(task, train_loader, stage, check=self._check(), val_fn=self._val_fn(val_loader))
        self.history[stage] = hist
        return hist

    def select_representatives(self, train_loader: DataLoader) -> Representatives:
        """Cluster each class's pre-logits features and pick each cluster's representative: its
        lowest-entropy image (``representatives.rule="min_entropy"``, the paper's) or the image nearest
        its centroid (``"nearest_centroid"``). See `encodenet_timm.representatives.select_representatives`.

        The model runs in eval mode over ``train_loader.dataset`` in dataset order (a fresh,
        unshuffled loader with the same workers). Use a loader without random augmentation.
        Under torchrun every rank must call it; every rank gets the same result.
        """
        check_loader(train_loader, "train_loader", map_style=True)
        self._settings()
        start = time.perf_counter()
        seed_everything(self.config.seed + _SEED_OFFSET["representatives"])
        self.representatives, k_per_class = select_representatives(
            self.model, train_loader, self.config.representatives, self.device, num_classes=self.num_classes,
            seed=self.config.seed, check=self._check(), channels_last=self.config.channels_last,
            progress=self.config.progress, amp=self.config.amp)
        self.plain_dataset = train_loader.dataset
        self.history["representatives"] = {"seconds": time.perf_counter() - start,
                                           "num_clusters": self.representatives.num_clusters,
                                           "k_per_class": k_per_class.tolist()}
        _logger.info("representatives: %d clusters over %d images", self.representatives.num_clusters,
                     self.representatives.labels.numel())
        self._checkpoint("representatives", 1, 1)
        return self.representatives

    def fit_autoencoder(self, train_loader: DataLoader, reps: Optional[Representatives] = None) -> List[Dict]:
        """Train encoder (from the current model) + decoder to map each image to its representative.

        Loss: MSE between decoder output and the representative, both in the normalised input space,
        plus ``autoencoder.ce_weight`` x cross-entropy of the head on the encoder's features (the head
        trains too) when that weight is > 0. `reps` are computed with `select_representatives(train_loader)`
        when not given.
        """
        check_loader(train_loader, "train_loader", map_style=True)
        reps = reps or self.representatives or self.select_representatives(train_loader)
        dataset = train_loader.dataset
        reps.check_covers(dataset)
        self._match_input_size(reps.images)
        seed_everything(self.config.seed + _SEED_OFFSET["autoencoder"])
        loader = make_loader(ClusterTargets(dataset, reps.cluster_ids), train_loader, shuffle=True,
                             seed=self.config.seed + _SEED_OFFSET["autoencoder"])
        self._snapshot_after_split()
        task = self.autoencoder_task(reps)
        hist = self._train(task, loader, "autoencoder",  # 0 epochs: train_stage skips it
                           check=self._check(image_size=self.input_size[1:], labels=False))
        self._decoder_trained = True
        self.history["autoencoder"] = hist
        return hist

    def autoencoder_task(self, reps: Representatives) -> ConvertingAutoencoderTask:
        """The autoencoder stage's task as `fit_autoencoder` trains it: encoder + decoder (+ the head when
        ``autoencoder.ce_weight`` > 0) trainable, the decoder channels_last when the config asks, targets
        `reps.images` (K, C, H, W) indexed by cluster id."""
        ce_weight = self.config.autoencoder.ce_weight
        decoder = self.decoder.requires_grad_(True)
        if self.config.channels_last:
            decoder.to(memory_format=torch.channels_last)
        head = self.head.requires_grad_(True) if ce_weight > 0 else None
        return ConvertingAutoencoderTask(ConvertingAutoencoder(self.encoder.requires_grad_(True), decoder, head),
                                         reps.images, device=self.device, cluster_labels=reps.cluster_labels,
                                         ce_weight=ce_weight)

    def fit_transfer(self, train_loader: DataLoader, val_loader: Optional[DataLoader] = None) -> List[Dict]:
        """Freeze the encoder (no gradient, BatchNorm statistics fixed) and retrain the head.

        With ``config.split`` inside the encoder, the modules after the split (`after_split`) first return to
        the weights they had before the autoencoder (the baseline's) and are retrained with the head.
        """
        check_loader(train_loader, "train_loader")
        cfg = self.config.transfer
        if not self._decoder_trained:
            _logger.warning("fit_transfer: no autoencoder was trained on this wrapper, so this only retrains the "
                            "head of the model as it is; call fit() to run the stages in order (or "
                            "fit_autoencoder first)")
        seed_everything(self.config.seed + _SEED_OFFSET["transfer"])
        if self.after_split and not self._run.resumes("transfer"):  # a resumed transfer already trains them
            self._restore_after_split()
        task = ClassificationTask(transfer_module(self.model, self.encoder, self.head, self.after_split),
                                  criterion_kwargs=dict(smoothing=cfg.smoothing),
                                  device=self.device, verbose=False)
        try:
            hist = self._train(task, train_loader, "transfer", check=self._check(), val_fn=self._val_fn(val_loader))
        finally:
            self.model.requires_grad_(True)
        self.history["transfer"] = hist
        return hist

    def fit_finetune(self, train_loader: DataLoader, val_loader: Optional[DataLoader] = None) -> List[Dict]:
        """Train every weight of the model (``config.finetune``, a short low-lr schedule) after transfer."""
        return self._fit_whole_model("finetune", train_loader, val_loader)

    def _snapshot_after_split(self) -> None:
        """Remember the weights after the split before the autoencoder changes them (once: the baseline's)."""
        if self.after_split and self._after_split_snapshot is None:
            self._after_split_snapshot = snapshot_modules(self.model, self.after_split)

    def _restore_after_split(self) -> None:
        if self._after_split_snapshot is not None:  # else no autoencoder ran: they hold the baseline's weights
            restore_modules(self.model, self.after_split, self._after_split_snapshot)

    # ---- use ---------------------------------------------------------------------------------------
    def load_weights(self, path: Union[str, Path]) -> None:
        """Load weights into the wrapped model: a model.safetensors file, a run directory (its
        model.safetensors) or a stage checkpoint directory (checked against its manifest).

        Raises:
            FileNotFoundError: nothing to load at `path`.
            ValueError: the file is corrupted or truncated, or was saved from another model (the
                message names the missing/unexpected keys or the first shape that differs).
        """
        load_state_into(self.model, load_model_file(path), str(path))

    def evaluate(self, loader: DataLoader) -> Dict[str, float]:
        """{"accuracy": top-1 in [0, 1], "loss": mean cross-entropy} of the current model on `loader`."""
        check_loader(loader, "loader")
        loader = named_reads(loader)  # an image file that cannot be read is named
        return evaluate(self.model, loader, self.device, check=self._check(),
                        channels_last=self.config.channels_last, amp=self.config.amp)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Autoencoder output for images (B, C, H, W) -> (B, C, H, W), eval mode, on x's device."""
        check_batch(x, torch.zeros(len(x), dtype=torch.long), num_classes=self.num_classes,
                    in_chans=self.input_size[0])
        if not self._decoder_trained:
            raise ValueError("reconstruct needs the trained autoencoder: call fit() or fit_autoencoder() first "
                             "(or fit(run_dir=..., resume=True) to load a run's)")
        self._match_input_size(x)
        return reconstruct_images(self.model, self.encoder, self.decoder, x.to(self.device)).to(x.device)

    def export(self) -> nn.Module:
        """The trained classifier as a plain timm model (a deep copy, on CPU, eval mode).

        Same class and parameter count as the model passed in; it holds no encodenet_timm object.
        """
        return plain_model(self.model)

    def export_timm(self, directory: Union[str, Path], *, label_names: Optional[Sequence[str]] = None,
                    mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                    data_config: Optional[Dict[str, Any]] = None) -> Path:
        """Write `export()` as timm's own folder at `directory` (config.json with the data config at `input_size`,
        model.safetensors): see `encodenet_timm.export.export_timm` for the arguments and what it refuses."""
        return export_timm(self.export(), directory, input_size=self.input_size, label_names=label_names, mean=mean,
                           std=std, data_config=data_config)
