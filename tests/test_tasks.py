import torch
import torch.nn as nn
import torch.nn.functional as F

from encodenet_timm.split import Encoder, Head, split_model
from encodenet_timm.tasks import (ConvertingAutoencoder, ConvertingAutoencoderTask, FrozenEncoderClassifier,
                                  PartlyFrozenClassifier, transfer_module)

from conftest import make_model


def _views(name="resnet10t"):
    model = make_model(name)
    enc, head = split_model(model, (3, 32, 32))
    return model, Encoder(model, enc), Head(model, head)


def test_autoencoder_task_loss_is_mse_to_the_cluster_representative():
    torch.manual_seed(0)
    reps = torch.randn(4, 3, 8, 8)
    ae = nn.Conv2d(3, 3, 1)
    task = ConvertingAutoencoderTask(ae, reps)
    x, cluster = torch.randn(5, 3, 8, 8), torch.tensor([0, 3, 3, 1, 2])
    out = task(x, cluster)
    assert torch.allclose(out["loss"], F.mse_loss(ae(x), reps[cluster]))
    assert out["output"].shape == x.shape
    assert task.get_trainable_module() is ae
    assert "rep_images" not in task.state_dict()  # a lookup table, not state


def test_frozen_encoder_stays_in_eval_mode_and_gets_no_gradient():
    model, encoder, head = _views()
    frozen = FrozenEncoderClassifier(encoder, head).train()
    assert not any(m.training for m in encoder.modules())
    assert all(m.training for m in head.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    frozen(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is not None for p in model.get_classifier().parameters())


def test_autoencoder_module_shapes():
    from encodenet_timm.decoder import build_decoder
    model, encoder, _ = _views()
    ae = ConvertingAutoencoder(encoder, build_decoder(model, (3, 32, 32)))
    assert ae(torch.randn(2, 3, 32, 32)).shape == (2, 3, 32, 32)


def test_transfer_module_trains_the_head_or_the_modules_after_the_split_with_it():
    model, enc, head = _views()
    whole = transfer_module(model, enc, head, [])
    assert isinstance(whole, FrozenEncoderClassifier)
    after = ["stages.3"]
    part = transfer_module(model, enc, head, after)
    assert isinstance(part, PartlyFrozenClassifier)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("stages.3.", *(f"{h}." for h in head.part_names))) for n in trained)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.allclose(whole(x), model(x)) and torch.allclose(part(x), model(x))
