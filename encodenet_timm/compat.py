"""Does EncodeNet work on this timm model? One call runs every part of the method once and says.

`check_model` splits the model, builds the mirrored decoder, runs one autoencoder step and one
transfer step through the wrapper's own stages on synthetic data, and exports the result. It
returns one JSON-ready record; a failure is recorded (step, error type, one-line reason), not raised.
``benchmarks/coverage.py`` runs it over one small model of every timm family.
"""
import time
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from .config import EncodeNetConfig
from .errors import EncodeNetError
from .representatives import Representatives
from .split import model_input_size
from .wrapper import EncodeNetWrapper

__all__ = ["check_model"]


class _CheckFailed(AssertionError):
    """A check on the package's own output failed (a bug in encodenet_timm, not a model limitation)."""


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise _CheckFailed(message)


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_model(model_or_name: Union[nn.Module, str], input_size: Optional[Tuple[int, int, int]] = None, *,
                num_classes: int = 10, create_kwargs: Optional[Dict[str, Any]] = None,
                batch_size: int = 4, seed: int = 0) -> Dict[str, Any]:
    """Run every EncodeNet part once on a timm classifier and report what worked.

    Checks, in order (the first failure ends the run):
        create: ``timm.create_model(name, pretrained=False, num_classes=..., **create_kwargs)`` (names only).
        split: every parameter on exactly one side, the classifier on the head side, and
            ``head(encoder(x)) == model(x)`` in eval mode.
        decoder: the decoder maps the encoder output back to (B, C, H, W); its FLOPs respect the cap.
        autoencoder: one `fit_autoencoder` step on synthetic images gives a finite loss.
        transfer: one `fit_transfer` step gives a finite loss and leaves the frozen encoder (all of it
            but the modules after ``config.split``) bit-identical.
        export: `export()` returns the same class with the same parameter count.

    Args:
        model_or_name: a timm classifier (wrapped as a copy, left untouched) or a timm model name.
        input_size: (C, H, W) to check at; the model's own size (`model_input_size`) when None.
        num_classes: classes of a model created from a name, and of the synthetic labels.
        create_kwargs: extra `timm.create_model` arguments for a name (``img_size=32`` ...).
        batch_size: images per synthetic batch (one batch per training step).
        seed: seeds the synthetic data and the wrapper.

    Raises:
        TypeError: `model_or_name` is neither an nn.Module nor a str (any later failure is recorded).

    Returns:
        A dict: model, params, input_size, layout ("NCHW", "NHWC", "NLC" tokens, "NCL" flattened map,
        "NC"), trace_path ("fx" or "hooks"), trail, output_index (the element of a list output the decoder
        mirrors; None for one tensor), light_blocks (depthwise decoder blocks a tiny encoder needed), encoder_flops, decoder_flops, flops_ratio, ae_loss, transfer_loss,
        status ("pass" or "fail"), step (the failing check), error_type (the exception's class name;
        "CheckFailed" when a check on the package's own output failed), reason (one line), clean (True
        when the failure is an `EncodeNetError`, i.e. the package said why), seconds.
    """
    if not isinstance(model_or_name, (str, nn.Module)):
        raise TypeError(f"check_model needs a timm model or a timm model name, got {type(model_or_name).__name__}")
    start = time.perf_counter()
    record: Dict[str, Any] = {
        "model": model_or_name if isinstance(model_or_name, str) else type(model_or_name).__name__,
        "params": None, "input_size": list(input_size) if input_size else None, "layout": None,
        "trace_path": None, "trail": None, "output_index": None, "light_blocks": None, "encoder_flops": None, "decoder_flops": None, "flops_ratio": None,
        "ae_loss": None, "transfer_loss": None, "status": "fail", "step": None, "error_type": None,
        "reason": None, "clean": None, "seconds": None,
    }
    step = "create"
    try:
        torch.manual_seed(seed)
        if isinstance(model_or_name, str):
            import timm
            model = timm.create_model(model_or_name, pretrained=False, num_classes=num_classes,
                                      **(create_kwargs or {}))
            copy = False  # ours: no need to keep it untouched
        else:
            model, copy = model_or_name, True
        num_classes = getattr(model, "num_classes", num_classes)
        n_params = sum(p.numel() for p in model.parameters())
        input_size = tuple(input_size or model_input_size(model))
        record.update(params=n_params, input_size=list(input_size))

        step = "split"
        cfg = EncodeNetConfig(seed=seed, device="cpu", progress=False, input_size=input_size)
        cfg.autoencoder.epochs, cfg.transfer.epochs, cfg.finetune.epochs = 1, 1, 1
        wrapper = EncodeNetWrapper(model, cfg, copy=copy)
        _check_split(wrapper, input_size, batch_size)

        step = "decoder"
        decoder = wrapper.decoder
        trail = decoder.shape_trail
        record.update(layout=trail.layout, trace_path=trail.trace, trail=[list(t) for t in trail.trail],
                      output_index=trail.output_index, light_blocks=decoder.light_blocks)
        flops = wrapper.flops()
        record.update(encoder_flops=flops["encoder"], decoder_flops=flops["decoder"], flops_ratio=flops["ratio"])
        x = torch.randn(batch_size, *input_size)
        wrapper.model.eval(), decoder.eval()
        with torch.no_grad():
            out = decoder(wrapper.encoder(x))
        _expect(tuple(out.shape) == tuple(x.shape), f"decoder output {tuple(out.shape)} != input {tuple(x.shape)}")
        _expect(flops["ratio"] <= cfg.decoder.max_flops_ratio,
                f"decoder/encoder FLOPs {flops['ratio']:.3g} over the cap {cfg.decoder.max_flops_ratio}")

        step = "autoencoder"
        loader, reps = _synthetic(input_size, num_classes, batch_size, seed)
        hist = wrapper.fit_autoencoder(loader, reps)
        record["ae_loss"] = hist[-1]["loss"]
        _expect(torch.isfinite(torch.tensor(record["ae_loss"])).item(), f"autoencoder loss {record['ae_loss']}")

        step = "transfer"
        enc_before = {k: v.clone() for k, v in wrapper.encoder.state_dict().items()}
        hist = wrapper.fit_transfer(loader)
        record["transfer_loss"] = hist[-1]["loss"]
        _expect(torch.isfinite(torch.tensor(record["transfer_loss"])).item(), f"transfer loss {record['transfer_loss']}")
        after = tuple(f"{t}." for t in wrapper.after_split)  # split inside the encoder: these modules (and their
        changed = [k for k, v in wrapper.encoder.state_dict().items()  # submodules) are retrained, the rest frozen
                   if not torch.equal(v, enc_before[k]) and not k.startswith(after)]
        _expect(not changed, f"transfer changed the frozen encoder: {changed[:3]}")

        step = "export"
        plain = wrapper.export()
        _expect(type(plain) is type(model), f"export() returned {type(plain).__name__}, not {type(model).__name__}")
        n_out = sum(p.numel() for p in plain.parameters())
        _expect(n_out == n_params, f"export() has {n_out:,} parameters, the model {n_params:,}")
        record.update(status="pass", step=None)
    except Exception as e:  # recorded, not raised: the record says where and why
        record.update(step=step, error_type=type(e).__name__.lstrip("_"), reason=_one_line(e),
                      clean=isinstance(e, EncodeNetError))
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def _check_split(wrapper: EncodeNetWrapper, input_size: Tuple[int, int, int], batch_size: int) -> None:
    """Ownership (each parameter on one side, classifier in the head) and head(encoder(x)) == model(x)."""
    model, encoder, head = wrapper.model, wrapper.encoder, wrapper.head
    enc_ids = {id(p) for p in encoder.parameters()}
    head_ids = {id(p) for p in head.parameters()}
    all_ids = {id(p) for p in model.parameters()}
    _expect(not enc_ids & head_ids, f"{len(enc_ids & head_ids)} parameters are on both sides")
    _expect(enc_ids | head_ids == all_ids, f"{len(all_ids - enc_ids - head_ids)} parameters are on neither side")
    classifier = model.get_classifier()  # distilled models return (head, head_dist)
    classifiers = classifier if isinstance(classifier, (tuple, list)) else [classifier]
    _expect(all(id(p) in head_ids for c in classifiers for p in c.parameters()),
            "the classifier (get_classifier()) is not on the head side")
    x = torch.randn(batch_size, *input_size)
    model.eval()
    with torch.no_grad():
        split_out, full_out = head(encoder(x)), model(x)
    _expect(split_out.shape == full_out.shape and torch.allclose(split_out, full_out, rtol=1e-5, atol=1e-5),
            f"head(encoder(x)) differs from model(x) by {(split_out - full_out).abs().max().item():.3g}"
            if split_out.shape == full_out.shape else
            f"head(encoder(x)) is {tuple(split_out.shape)}, model(x) is {tuple(full_out.shape)}")


def _synthetic(input_size: Tuple[int, int, int], num_classes: int, batch_size: int,
               seed: int) -> Tuple[DataLoader, Representatives]:
    """One batch of random images with labels 0, 1, ...; one cluster per image, the image its own target."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, *input_size, generator=g)  # (B, C, H, W)
    labels = torch.arange(batch_size) % num_classes
    ids = torch.arange(batch_size)
    reps = Representatives(labels=labels, cluster_ids=ids, entropy=torch.zeros(batch_size), rep_indices=ids,
                           cluster_labels=labels, images=images)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size), reps
