"""EncodeNetWrapper: the EncodeNet stages, in order, as plain code.

baseline (optional) -> representatives -> converting autoencoder -> transfer -> finetune (optional) -> export.
"""
import logging
import time
from copy import deepcopy as _deepcopy
from itertools import chain
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.task import ClassificationTask
from torch.utils.data import DataLoader, Dataset

from . import distributed as dist
from ._env import machine, versions
from .checkpoint import Checkpoint, RunDir, load_model_file, load_state_into, model_fingerprint
from .config import EncodeNetConfig
from .decoder import MirroredDecoder, build_decoder
from .device_data import DeviceBatch
from .representatives import Representatives
from .selection import select_representatives
from .split import Encoder, Head, check_timm_classifier, model_input_size, modules_after, split_model
from .tasks import ConvertingAutoencoder, ConvertingAutoencoderTask, FrozenEncoderClassifier, PartlyFrozenClassifier
from .training import (TrainState, check_batch, check_data, check_loader, evaluate, make_loader, resolve_device,
                       seed_everything, train_stage)

__all__ = ["EncodeNetWrapper"]

_logger = logging.getLogger(__name__)

# offsets keep each stage's random stream distinct but fixed by the one config seed
_SEED_OFFSET = {"baseline": 0, "representatives": 1, "autoencoder": 2, "transfer": 3, "finetune": 4}
# what a run directory checkpoints, in order; "initial" is the model as passed in
RUN_STAGES = ("initial", "baseline", "representatives", "autoencoder", "transfer", "finetune")


class _ClusterTargets(Dataset):
    """(image, label) dataset -> (image, cluster id of that index)."""

    def __init__(self, dataset: Dataset, cluster_ids: torch.Tensor):
        self.dataset, self.cluster_ids = dataset, cluster_ids

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i][0], self.cluster_ids[i]

    def __getitems__(self, indices):  # a device dataset builds the whole batch at once (device_data.py)
        batch = self.dataset.__getitems__(indices) if hasattr(self.dataset, "__getitems__") else None
        if isinstance(batch, DeviceBatch):
            return DeviceBatch((batch[0], self.cluster_ids[torch.as_tensor(indices)]))
        return [(x, self.cluster_ids[i]) for (x, _), i in zip(batch or [self.dataset[i] for i in indices], indices)]


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
        if config is None:
            config = EncodeNetConfig()
        if not isinstance(config, EncodeNetConfig):
            raise TypeError(f"config must be an EncodeNetConfig, got {type(config).__name__}")
        # a validated copy: a value of the wrong type set by hand -> ValueError, and a plain StageConfig
        # given for a stage with more options (autoencoder) gets their defaults
        config = self.config = type(config).from_dict(config.to_dict())
        self.device = resolve_device(dist.local_device(config.device))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
        if self.device.type == "cuda" and dist.is_distributed():
            torch.cuda.set_device(self.device)  # NCCL's object collectives use the current device
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
        self.tail: List[str] = modules_after(self.model, config.split, self.input_size)
        self._tail_snapshot: Optional[Dict[str, torch.Tensor]] = None
        self._decoder: Optional[MirroredDecoder] = None
        self._decoder_trained = False
        self.representatives: Optional[Representatives] = None
        self.history: Dict[str, Any] = {}
        self._run: Optional[RunDir] = None  # set while fit(run_dir=...) runs
        self._resume: Dict[str, TrainState] = {}  # stage -> loop state to continue it from

    # ---- parts -------------------------------------------------------------------------------------
    @property
    def decoder(self) -> MirroredDecoder:
        """The mirrored decoder, built on first use at `input_size`."""
        if self._decoder is None:
            self._decoder = build_decoder(self.model, self.input_size, self.config.decoder).to(self.device)
        return self._decoder

    def _match_input_size(self, x: torch.Tensor) -> None:
        """Rebuild the (still untrained) decoder if the data's (H, W) differs from `input_size`."""
        size = (self.input_size[0], *x.shape[2:])
        if tuple(size) == tuple(self.input_size) or x.shape[1] != self.input_size[0]:
            return
        if self._decoder_trained:
            raise ValueError(f"images are {tuple(x.shape[1:])} but the trained decoder expects {self.input_size}")
        _logger.info("data is %s, not %s: building the decoder for the data's size", tuple(size), self.input_size)
        self.input_size, self._decoder = tuple(size), None

    def flops(self) -> Dict[str, float]:
        """FLOPs of one image through encoder and decoder at `input_size`, and their ratio."""
        d = self.decoder
        return {"encoder": d.encoder_flops, "decoder": d.flops, "ratio": d.flops / d.encoder_flops}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of the wrapped model for images (B, C, H, W), on x's device."""
        return self.model(x.to(self.device)).to(x.device)

    def _check(self, image_size: Optional[Tuple[int, int]] = None, labels: bool = True):
        def check(x, y):
            check_batch(x, y if labels else torch.zeros(len(x), dtype=torch.long), num_classes=self.num_classes,
                        in_chans=self.input_size[0], image_size=image_size)
        return check

    def _train_kwargs(self, stage: str) -> Dict[str, Any]:
        c = self.config
        epochs = getattr(c, stage).epochs
        return dict(device=self.device, amp=c.amp, channels_last=c.channels_last, progress=c.progress,
                    compile=c.compile, seed=c.seed + _SEED_OFFSET[stage], resume=self._resume.pop(stage, None),
                    on_epoch_end=lambda state: self._checkpoint(stage, state.epoch, epochs, state))

    def _val_fn(self, val_loader: Optional[DataLoader]):
        if val_loader is None:
            return None
        check_loader(val_loader, "val_loader")
        return lambda: self.evaluate(val_loader)

    # ---- stages ------------------------------------------------------------------------------------
    def fit(self, train_loader: DataLoader, val_loader: Optional[DataLoader] = None, *,
            plain_loader: Optional[DataLoader] = None, run_dir: Optional[Union[str, Path]] = None,
            resume: bool = False) -> Dict[str, Any]:
        """Run every stage: baseline (if ``config.baseline.epochs > 0``) -> representatives ->
        autoencoder -> transfer -> finetune (if ``config.finetune.epochs > 0``).

        Args:
            train_loader: (images (B, C, H, W), labels (B,)) over a map-style dataset; may augment.
            val_loader: optional, evaluated after every epoch of the classification stages.
            plain_loader: the training set without random augmentation, same order and length as
                `train_loader`'s dataset, for the feature pass and the representative images;
                `train_loader` is used when None.
            run_dir: write config.yaml, run.json, a checkpoint at every epoch end and, at the end,
                model.safetensors there (layout: `encodenet_timm.checkpoint`).
            resume: continue the run in `run_dir` from the last complete epoch of its last stage.

        Returns:
            The history: per stage, a list of per-epoch dicts (loss, accuracy where defined, seconds, ...).

        Raises:
            ValueError: bad data (checked before any training), or a `run_dir` that cannot be used
                (see `RunDir.begin`).
        """
        check_loader(train_loader, "train_loader", map_style=True)
        if resume and run_dir is None:
            raise ValueError("resume=True needs the run_dir of the run to continue")
        check_data(train_loader, self.model, self.device, in_chans=self.input_size[0],
                   clusters_per_class=self.config.representatives.clusters_per_class)
        done: Tuple[str, ...] = ()
        if run_dir is not None:  # under torchrun rank 0 writes it, every rank reads it to resume
            run_dir_ = RunDir(run_dir, RUN_STAGES)
            if dist.is_main():
                run_dir_.begin(self.config.to_dict(), {"model": model_fingerprint(self.model), "seed": self.config.seed,
                                                       "versions": versions(), "machine": machine(self.device)}, resume)
                self._run = run_dir_
            dist.barrier()
            if resume:
                done = self._restore(run_dir_)
            else:
                self._checkpoint("initial", 0, 0)
        c = self.config
        plan = (("baseline", c.baseline.epochs > 0, lambda: self.fit_baseline(train_loader, val_loader)),
                ("representatives", True, lambda: self.select_representatives(plain_loader or train_loader)),
                ("autoencoder", True, lambda: self.fit_autoencoder(train_loader, self.representatives)),
                ("transfer", True, lambda: self.fit_transfer(train_loader, val_loader)),
                ("finetune", c.finetune.epochs > 0, lambda: self.fit_finetune(train_loader, val_loader)))
        run = self._run
        try:
            for stage, enabled, run_stage in plan:
                if stage in done:
                    continue
                if not enabled:
                    if run is not None:
                        run.update_stage(stage, status="skipped")
                    continue
                run_stage()
        except (Exception, KeyboardInterrupt) as e:
            if run is not None:
                run.fail(stage, e)
                _logger.error("%s stopped: %s; %s keeps the last complete checkpoint, fit(..., resume=True) "
                              "continues from it", stage, e, run.path)
            raise
        finally:
            self._run, self._resume = None, {}
        if run is not None:
            run.finish(self.export().state_dict())
        dist.barrier()  # the other ranks return once the run directory is complete
        return self.history

    def _checkpoint(self, stage: str, epoch: int, epochs: int, train: Optional[TrainState] = None) -> None:
        """Write `stage`'s checkpoint after `epoch` of its `epochs` (nothing outside fit(run_dir=...))."""
        if self._run is None:
            return
        tensors = {"model": self.model.state_dict()}
        if self._decoder is not None:
            tensors["decoder"] = self._decoder.state_dict()
        if self._tail_snapshot is not None:
            tensors["tail"] = self._tail_snapshot
        writers = {}
        if self.representatives is not None:
            writers["representatives.safetensors"] = self.representatives.save
        history = {**self.history, **({stage: train.history} if train is not None else {})}
        decoder_trained = self._decoder_trained or (stage == "autoencoder" and epoch >= epochs)
        state = {"history": history, "input_size": list(self.input_size), "decoder_trained": decoder_trained}
        self._run.save(stage, epoch, epochs, tensors=tensors, state=state, train=train, writers=writers)

    def _restore(self, run: RunDir) -> Tuple[str, ...]:
        """Load the wrapper's state from the run's latest checkpoint; returns the stages it completed.

        Raises:
            ValueError: the run has no complete checkpoint, or one of its files is corrupted.
        """
        ckpt: Optional[Checkpoint] = run.latest()
        if ckpt is None:
            raise ValueError(f"{run.path} holds no complete checkpoint to resume from; run without resume "
                             f"to start it again")
        load_state_into(self.model, ckpt.tensors("model"), str(ckpt.directory))
        self.history = dict(ckpt.state["history"])
        self.input_size = tuple(ckpt.state["input_size"])
        self._decoder_trained = ckpt.state["decoder_trained"]
        if ckpt.has("decoder.safetensors"):
            self._decoder = None  # rebuilt at the checkpoint's input size
            load_state_into(self.decoder, ckpt.tensors("decoder"), str(ckpt.directory))
        if ckpt.has("representatives.safetensors"):
            self.representatives = Representatives.load(ckpt.path("representatives.safetensors"))
        if ckpt.has("tail.safetensors"):
            self._tail_snapshot = {k: v.to(self.device) for k, v in ckpt.tensors("tail").items()}
        if not ckpt.stage_complete:
            self._resume[ckpt.stage] = ckpt.train_state()
        _logger.info("resuming %s from %s epoch %d/%d", run.path, ckpt.stage, ckpt.epoch, ckpt.epochs)
        return RUN_STAGES[:RUN_STAGES.index(ckpt.stage) + ckpt.stage_complete]

    def fit_baseline(self, train_loader: DataLoader, val_loader: Optional[DataLoader] = None) -> List[Dict]:
        """Ordinary supervised training of the whole model (``config.baseline``)."""
        return self._fit_whole_model("baseline", train_loader, val_loader)

    def _fit_whole_model(self, stage: str, train_loader: DataLoader,
                         val_loader: Optional[DataLoader]) -> List[Dict]:
        """Supervised training of every weight with ``config.<stage>`` (baseline and finetune)."""
        check_loader(train_loader, "train_loader")
        cfg = getattr(self.config, stage)
        seed_everything(self.config.seed + _SEED_OFFSET[stage])
        self.model.requires_grad_(True)
        task = ClassificationTask(self.model, criterion_kwargs=dict(smoothing=cfg.smoothing),
                                  device=self.device, verbose=False)
        hist = train_stage(task, train_loader, cfg, stage=stage, check=self._check(),
                           val_fn=self._val_fn(val_loader), **self._train_kwargs(stage))
        self.history[stage] = hist
        return hist

    def select_representatives(self, train_loader: DataLoader) -> Representatives:
        """Cluster each class's pre-logits features and pick each cluster's representative: its
        lowest-entropy image (``representatives.rule="min_entropy"``, the paper's) or the image nearest
        its centroid (``"nearest_centroid"``). See `encodenet_timm.selection.select_representatives`.

        The model runs in eval mode over ``train_loader.dataset`` in dataset order (a fresh,
        unshuffled loader with the same workers). Use a loader without random augmentation.
        Under torchrun every rank must call it; every rank gets the same result.
        """
        check_loader(train_loader, "train_loader", map_style=True)
        start = time.perf_counter()
        seed_everything(self.config.seed + _SEED_OFFSET["representatives"])
        self.representatives, k_per_class = select_representatives(
            self.model, train_loader, self.config.representatives, self.device, num_classes=self.num_classes,
            seed=self.config.seed, check=self._check(), channels_last=self.config.channels_last,
            progress=self.config.progress)
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
        if reps.cluster_ids.numel() != len(dataset):
            raise ValueError(f"representatives cover {reps.cluster_ids.numel()} images but the training set "
                             f"has {len(dataset)}; select them on this training set")
        self._match_input_size(reps.images)
        cfg = self.config.autoencoder
        seed_everything(self.config.seed + _SEED_OFFSET["autoencoder"])
        loader = make_loader(_ClusterTargets(dataset, reps.cluster_ids), train_loader, shuffle=True,
                             seed=self.config.seed + _SEED_OFFSET["autoencoder"])
        decoder = self.decoder
        if self.config.channels_last:
            decoder.to(memory_format=torch.channels_last)
        self._snapshot_tail()
        self.encoder.requires_grad_(True)
        decoder.requires_grad_(True)
        head = self.head.requires_grad_(True) if cfg.ce_weight > 0 else None
        task = ConvertingAutoencoderTask(ConvertingAutoencoder(self.encoder, decoder, head), reps.images,
                                         device=self.device, cluster_labels=reps.cluster_labels,
                                         ce_weight=cfg.ce_weight)
        hist = train_stage(task, loader, cfg, stage="autoencoder",
                           check=self._check(image_size=self.input_size[1:], labels=False),
                           **self._train_kwargs("autoencoder"))  # 0 epochs: train_stage skips it
        self._decoder_trained = True
        self.history["autoencoder"] = hist
        return hist

    def fit_transfer(self, train_loader: DataLoader, val_loader: Optional[DataLoader] = None) -> List[Dict]:
        """Freeze the encoder (no gradient, BatchNorm statistics fixed) and retrain the head.

        With ``config.split`` inside the encoder, the stages after the split (`tail`) first return to
        the weights they had before the autoencoder (the baseline's) and are retrained with the head.
        """
        check_loader(train_loader, "train_loader")
        cfg = self.config.transfer
        seed_everything(self.config.seed + _SEED_OFFSET["transfer"])
        if self.tail:
            if "transfer" not in self._resume:  # a resumed transfer already trains the restored tail
                self._restore_tail()
            trainable = PartlyFrozenClassifier(self.model, self.tail + self.head.part_names)
        else:
            trainable = FrozenEncoderClassifier(self.encoder, self.head.requires_grad_(True))
        task = ClassificationTask(trainable, criterion_kwargs=dict(smoothing=cfg.smoothing),
                                  device=self.device, verbose=False)
        try:
            hist = train_stage(task, train_loader, cfg, stage="transfer", check=self._check(),
                               val_fn=self._val_fn(val_loader), **self._train_kwargs("transfer"))
        finally:
            self.model.requires_grad_(True)
        self.history["transfer"] = hist
        return hist

    def fit_finetune(self, train_loader: DataLoader, val_loader: Optional[DataLoader] = None) -> List[Dict]:
        """Train every weight of the model (``config.finetune``, a short low-lr schedule) after transfer."""
        return self._fit_whole_model("finetune", train_loader, val_loader)

    def _tail_state(self) -> Dict[str, torch.Tensor]:
        """The tail's parameters and buffers, submodules included, by qualified name in the model (live
        tensors). Recursive: a submodule whose weight is used functionally (beit's ``attn.qkv`` through
        ``F.linear``) is not in the traced tail itself, but it is trained with its parent."""
        prefixes = tuple(f"{name}." for name in self.tail)
        named = chain(self.model.named_parameters(remove_duplicate=False),
                      self.model.named_buffers(remove_duplicate=False))
        return {key: t for key, t in named if key.startswith(prefixes)}

    def _snapshot_tail(self) -> None:
        """Remember the tail's weights before the autoencoder changes them (once: the baseline's)."""
        if self.tail and self._tail_snapshot is None:
            self._tail_snapshot = {k: t.detach().clone() for k, t in self._tail_state().items()}

    def _restore_tail(self) -> None:
        if self._tail_snapshot is None:
            return  # no autoencoder ran: the tail still holds the baseline's weights
        with torch.no_grad():
            for key, t in self._tail_state().items():
                t.copy_(self._tail_snapshot[key])

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
        return evaluate(self.model, loader, self.device, check=self._check(),
                        channels_last=self.config.channels_last)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Autoencoder output for images (B, C, H, W) -> (B, C, H, W), eval mode, on x's device."""
        check_batch(x, torch.zeros(len(x), dtype=torch.long), num_classes=self.num_classes,
                    in_chans=self.input_size[0])
        self._match_input_size(x)
        ae = ConvertingAutoencoder(self.encoder, self.decoder)
        was_training = self.model.training, self.decoder.training
        ae.eval()
        try:
            out = ae(x.to(self.device))
        finally:
            self.model.train(was_training[0])
            self.decoder.train(was_training[1])
        return out.to(x.device)

    def export(self) -> nn.Module:
        """The trained classifier as a plain timm model (a deep copy, on CPU, eval mode).

        Same class and parameter count as the model passed in; it holds no encodenet_timm object.
        """
        plain = _deepcopy(self.model).cpu().eval()
        plain.requires_grad_(True)
        return plain.to(memory_format=torch.contiguous_format)

