"""Check the timm classifier contract and split a model into encoder and head.

A timm classifier computes ``forward_head(forward_features(x))``. The encoder is every part used
by ``forward_features``; the head is every part used by ``forward_head``. Both are views: they
hold the model's own submodules and parameters (no copies), so training either trains the model.
"""
import logging
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from .errors import UnsupportedModelError

__all__ = ["check_timm_classifier", "split_model", "Encoder", "Head", "model_input_size", "stage_names",
           "modules_after"]

_logger = logging.getLogger(__name__)

_REQUIRED = ("forward_features", "forward_head", "get_classifier", "reset_classifier")


def check_timm_classifier(model: object) -> nn.Module:
    """Raise `TypeError` unless `model` follows timm's classifier contract, `ValueError` unless its weights
    are float32 tensors with data (not on the meta device); return it unchanged."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"EncodeNet needs a timm classifier (an nn.Module from timm.create_model), got {type(model).__name__}. "
            f"Create one with timm.create_model('<name>', num_classes=N).")
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
        raise TypeError(
            f"the model is torch.compile'd ({type(model._orig_mod).__name__} inside {type(model).__name__}); pass "
            f"the uncompiled model (model._orig_mod) and set config.compile=True to compile each training stage")
    missing = [m for m in _REQUIRED if not callable(getattr(model, m, None))]
    if missing or not isinstance(getattr(model, "num_classes", None), int):
        what = ", ".join(missing) if missing else "an int `num_classes` attribute"
        raise TypeError(
            f"{type(model).__name__} is not a timm-style classifier: it lacks {what}. EncodeNet needs "
            f"forward_features(x) -> features and forward_head(features, pre_logits=False) -> logits; "
            f"wrap your network so it provides them, or use a model from timm.create_model().")
    if model.num_classes < 2:
        raise ValueError(
            f"{type(model).__name__} has num_classes={model.num_classes}; EncodeNet needs a classifier head "
            f"with at least 2 classes (timm.create_model(name, num_classes=N)).")
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.is_meta for t in tensors):
        raise ValueError(
            f"{type(model).__name__} has its weights on the meta device (shapes, no data); materialise them first: "
            f"model.to_empty(device='cpu') then load or initialise the weights, or create it without "
            f"torch.device('meta')")
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if dtypes:
        raise ValueError(
            f"{type(model).__name__}'s parameters are {', '.join(dtypes)}, but EncodeNet trains float32 models; "
            f"pass model.float() (config.amp runs bf16/fp16 autocast on a GPU)")
    return model


def model_input_size(model: nn.Module) -> Tuple[int, int, int]:
    """The (C, H, W) the model was built for.

    timm's own ``resolve_model_data_config`` reads only ``pretrained_cfg``, which keeps the registered
    size (224) when the model was built with ``img_size=64``; the built size is what the model runs at.
    It is read, in order, from ``model.patch_embed.img_size`` (ViT, Swin, ...), ``model.img_size``
    (MaxViT, CrossViT, ...), then the first submodule with an ``img_size`` (CoaT's ``patch_embed1``), then
    the first ``feature_info`` stage's ``feat_size`` x its reduction (GCViT); models that store none (CNNs)
    get ``pretrained_cfg["input_size"]``. ``config.input_size`` overrides it.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    c = getattr(model, "in_chans", None) or _first_conv_in_channels(model) or c
    img_size = _built_img_size(model)
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return int(c), int(h), int(w)


def _built_img_size(model: nn.Module):
    """An int or (H, W) image size the model stores from its constructor, or None."""
    first = (getattr(model, "patch_embed", None), model)
    for m in (*first, *model.modules()):
        size = getattr(m, "img_size", None) if m is not None else None
        if isinstance(size, int) or (isinstance(size, (tuple, list)) and len(size) == 2
                                     and all(isinstance(v, int) for v in size)):
            return size
    for info in getattr(model, "feature_info", None) or []:  # GCViT: a stage's feat_size x its reduction
        try:
            stage = model.get_submodule(info["module"])
        except (AttributeError, KeyError, TypeError):
            continue
        feat = getattr(stage, "feat_size", None)
        if isinstance(feat, (tuple, list)) and len(feat) == 2 and all(isinstance(v, int) for v in feat):
            return tuple(int(v) * int(info["reduction"]) for v in feat)
    return None


def _first_conv_in_channels(model: nn.Module):
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def _part_names(model: nn.Module) -> List[str]:
    """Top-level parts: named children, then parameters and buffers set directly on the model."""
    names = [n for n, _ in model.named_children()]
    names += [n for n, _ in model.named_parameters(recurse=False)]
    names += [n for n, _ in model.named_buffers(recurse=False)]
    return names


def split_model(model: nn.Module, input_size: Tuple[int, int, int]) -> Tuple[List[str], List[str]]:
    """Find which top-level parts `forward_features` and `forward_head` use.

    Ownership is read from autograd on one eval-mode pass of a random (2, C, H, W) input: a part whose
    parameters receive gradient from ``forward_features`` belongs to the encoder; one whose parameters
    receive gradient only from ``forward_head`` belongs to the head. Parts without parameters (pools,
    activations) and unused parts go to the side whose code path calls them, or to the encoder if none.

    Returns:
        (encoder_parts, head_parts): names of top-level children/parameters/buffers of `model`.

    Raises:
        UnsupportedModelError: a part is used by both sides, or the forward fails at this input size.
    """
    parts = _part_names(model)
    params = dict(model.named_parameters())
    part_of = {n: n.split(".")[0] for n in params}
    saved_grad = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    called: Dict[str, set] = {"encoder": set(), "head": set()}
    side = ["encoder"]
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: called[side[0]].add(name))
             for name, m in model.named_children()]
    try:
        for p in params.values():
            p.requires_grad_(True)
        model.eval()
        x = torch.randn(2, *input_size, device=_device_of(model))
        feats = model.forward_features(x)
        tensors = _feature_tensors(model, feats)
        enc_grads = torch.autograd.grad(sum(t.float().square().sum() for t in tensors), list(params.values()),
                                        allow_unused=True)
        side[0] = "head"
        detached = [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]
        out = model.forward_head(detached if isinstance(feats, (list, tuple)) else detached[0])
        head_grads = torch.autograd.grad(out.float().square().sum(), list(params.values()), allow_unused=True)
    except UnsupportedModelError:
        raise
    except Exception as e:  # a forward failing here is a model/input-size problem, say which
        _check_built_size(model, input_size, e)
        raise UnsupportedModelError(
            f"{type(model).__name__} failed a forward pass at input size {tuple(input_size)}: "
            f"{type(e).__name__}: {e}. Set config.input_size to a size this model accepts.") from e
    finally:
        for h in hooks:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(saved_grad[n])
        model.train(was_training)

    enc_parts = {part_of[n] for n, g in zip(params, enc_grads) if g is not None}
    head_parts = {part_of[n] for n, g in zip(params, head_grads) if g is not None}
    both = enc_parts & head_parts
    if both:
        raise UnsupportedModelError(
            f"{type(model).__name__}: parts {sorted(both)} are used by both forward_features and forward_head; "
            f"EncodeNet needs each parameter on exactly one side.")
    encoder, head = [], []
    for name in parts:
        if name in enc_parts:
            encoder.append(name)
        elif name in head_parts or (name in called["head"] and name not in called["encoder"]):
            head.append(name)
        else:
            encoder.append(name)  # parameter-free or unused: the feature side by default
    if not head_parts:
        raise UnsupportedModelError(
            f"{type(model).__name__}: forward_head uses no parameters; EncodeNet needs a trainable classifier.")
    return encoder, head


def _check_built_size(model: nn.Module, input_size: Tuple[int, int, int], error: Exception) -> None:
    """Raise ValueError saying how to build `model` for `input_size` when its forward failed (`error`) and
    the model stores another image size from its constructor (a ViT built for 224x224 given 32x32)."""
    built = _built_img_size(model)
    built = (built, built) if isinstance(built, int) else built
    h, w = input_size[1:]
    if built is None or tuple(built) == (h, w):
        return
    arg = h if h == w else [h, w]
    why = (str(error).strip().splitlines() or [""])[0]
    raise ValueError(
        f"{type(model).__name__} is built for {built[0]}x{built[1]} images but runs here at {h}x{w} (the data's "
        f"size, or config.input_size): build it for {h}x{w} with timm.create_model(name, img_size={arg}) "
        f"(encodenet: --model-arg img_size={arg}), or resize the images to {built[0]}x{built[1]}"
        + (f" (encodenet: --img-size {built[0]})" if built[0] == built[1] else "")
        + f" ({type(error).__name__}: {why})") from error


def _feature_tensors(model: nn.Module, feats) -> List[torch.Tensor]:
    """The tensors of a ``forward_features`` output: one tensor, or a list/tuple of them (CoaT, CrossViT,
    EfficientViM), which the encoder passes to ``forward_head`` unchanged."""
    if isinstance(feats, torch.Tensor):
        return [feats]
    if isinstance(feats, (list, tuple)) and feats and all(isinstance(t, torch.Tensor) for t in feats):
        return list(feats)
    raise UnsupportedModelError(
        f"{type(model).__name__}.forward_features returned {type(feats).__name__}; EncodeNet needs a tensor or "
        f"a list of tensors.")


def stage_names(model: nn.Module) -> List[str]:
    """Module names of the model's stages from timm's ``feature_info`` (e.g. ["act1", "layer1", ...]).

    Only names of modules the model has: some timm models' ``feature_info`` names a module that does not
    exist (twins and mvitv2 say "block.2" for their ``blocks.2`` / ``stages.2``); those are left out.
    """
    info = getattr(model, "feature_info", None) or []
    names = [f.get("module") for f in info if isinstance(f, dict)] if isinstance(info, list) else []
    modules = dict(model.named_modules())
    return [n for n in names if n and n in modules]


def modules_after(model: nn.Module, stage: str, input_size: Tuple[int, int, int]) -> List[str]:
    """Qualified names of the modules `forward_features` starts only after module `stage` has returned.

    Read from forward hooks on one eval-mode pass of a random (1, C, H, W) input. With
    ``stage="features"`` (the paper's split) the list is empty; ``"last_stage"`` splits before the
    model's last ``feature_info`` stage (the second-to-last stage's name).

    Raises:
        ValueError: `stage` is not "features", "last_stage" or a module of the model's ``feature_info``.
    """
    if stage == "features":
        return []
    valid = stage_names(model)
    if stage == "last_stage":
        if len(valid) < 2:
            _logger.warning("split='last_stage': %s has feature_info stages %s (modules it has), fewer than "
                            "two; splitting at 'features' instead", type(model).__name__, valid)
            return []
        stage = valid[-2]
    if stage not in valid:
        raise ValueError(f"split={stage!r} is not a stage of {type(model).__name__}; use 'features', "
                         f"'last_stage' or one of its feature_info modules: {valid}")
    modules = dict(model.named_modules())
    order: List[str] = []
    done: List[int] = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: order.append(name))
             for name, m in modules.items() if name]
    hooks.append(modules[stage].register_forward_hook(lambda mod, inp, out: done.append(len(order))))
    # a ModuleList stage (CoaT's "parallel_blocks") is never called itself, only its blocks are: then it
    # ends when the last of its submodules returns
    sub_done: List[int] = []
    hooks += [m.register_forward_hook(lambda mod, inp, out: sub_done.append(len(order)))
              for m in list(modules[stage].modules())[1:]]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model.forward_features(torch.randn(1, *input_size, device=_device_of(model)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    done = done or sub_done
    if not done:
        raise ValueError(f"split={stage!r}: forward_features of {type(model).__name__} never calls it")
    after = set(order[done[-1]:])
    # a module counts only if it is not also called before the stage ends (shared modules stay frozen)
    after -= set(order[:done[-1]])
    return [n for n in modules if n in after]


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


class _ModelView(nn.Module):
    """Registers a subset of a model's top-level parts under their own names (shared, not copied)."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a submodule: the view owns only `names`
        children = dict(model.named_children())
        for name in names:
            if name in children:
                self.add_module(name, children[name])
            elif name in model._parameters:
                self.register_parameter(name, model._parameters[name])
            else:
                self.register_buffer(name, model._buffers[name], persistent=name not in model._non_persistent_buffers_set)
        self.part_names = list(names)

    def train(self, mode: bool = True) -> "_ModelView":
        """Set the mode of the owned parts and the model's own flag (timm reads ``self.training`` there)."""
        super().train(mode)
        self._model.training = mode
        return self


class Encoder(_ModelView):
    """The model's feature extractor: ``(B, C, H, W) -> model.forward_features(x)``, a tensor or, for
    CoaT, CrossViT and EfficientViM, the list of tensors ``forward_head`` consumes (passed on unchanged)."""

    def forward(self, x: torch.Tensor):
        return self._model.forward_features(x)


class Head(_ModelView):
    """The model's classifier: ``forward_features`` output (a tensor or a list) -> logits (B, num_classes)."""

    def forward(self, x, pre_logits: bool = False) -> torch.Tensor:
        return self._model.forward_head(x, pre_logits=pre_logits)
