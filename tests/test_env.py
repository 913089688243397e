"""env: the device a name resolves to, the precision a run gets (amp -> autocast dtype on this device), and the machine facts records hold."""
import pytest
import timm
import torch
from torch.utils.data import DataLoader

from encodenet_timm import EncodeNetConfig, EncodeNetWrapper
from encodenet_timm import env
from encodenet_timm.env import autocast_dtype, machine, precision, resolve_device

CPU = torch.device("cpu")


def test_auto_is_bf16_exactly_where_the_cpu_multiplies_bf16_natively(monkeypatch):
    monkeypatch.setattr(env, "cpu_flags", lambda: ["amx_tile", "avx512_bf16", "avx512"])
    assert autocast_dtype(CPU, "auto") == torch.bfloat16 and precision(CPU, "auto") == "bf16"
    monkeypatch.setattr(env, "cpu_flags", lambda: ["avx512", "avx2"])  # bf16 would be emulated: slower
    assert autocast_dtype(CPU, "auto") is None and precision(CPU, "auto") == "fp32"
    assert autocast_dtype(CPU, "bf16") == torch.bfloat16  # forced on any CPU
    assert autocast_dtype(CPU, "none") is None


def test_fp16_on_a_cpu_and_unknown_values_are_refused_with_what_to_use():
    with pytest.raises(ValueError, match="needs a CUDA device; on a CPU use amp='bf16'"):
        autocast_dtype(CPU, "fp16")
    with pytest.raises(ValueError, match="amp must be"):
        autocast_dtype(CPU, "int8")
    with pytest.raises(ValueError, match="needs a CUDA device"):  # before any training, when the wrapper is built
        EncodeNetWrapper(timm.create_model("resnet10t", num_classes=10), EncodeNetConfig(device="cpu", amp="fp16"))


def test_the_machine_record_names_the_cpu_flags_torch_sees():
    m = machine()
    assert isinstance(m["cpu_flags"], list) and m["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if torch.cpu._is_amx_tile_supported():
        assert "amx_tile" in m["cpu_flags"] and env.cpu_has_native_bf16()


@pytest.mark.parametrize("amp, expect", [("bf16", torch.bfloat16), ("none", None)])
def test_every_stage_runs_under_the_asked_precision(digits, amp, expect):
    """A hook on the model's stem records the autocast state of every forward through it: baseline, the
    feature pass, autoencoder, transfer, fine-tune and evaluation all run in bf16 when asked, in fp32 with
    amp="none"; the weights stay fp32 either way."""
    train, test = digits
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    cfg = EncodeNetConfig(device="cpu", amp=amp, progress=False, input_size=(3, 32, 32)).override({
        "baseline.epochs": 1, "autoencoder.epochs": 1, "transfer.epochs": 1, "finetune.epochs": 1,
        "representatives.clusters_per_class": 2})
    w = EncodeNetWrapper(model, cfg)
    seen = []

    def hook(module, args):
        if args[0].shape[0] > 1:  # a batch; one image is a shape probe (the pre-logits size, the decoder's trace)
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
    w.model.conv1.register_forward_pre_hook(hook)  # the stem: every stage's forward passes through it
    loader = DataLoader(torch.utils.data.Subset(train, range(128)), batch_size=64)
    w.decoder  # built (its shape trace runs the encoder on a probe batch) before the stages are watched
    stages = {}
    for stage, run in (("baseline", lambda: w.fit_baseline(loader)), ("features", lambda: w.select_representatives(loader)),
                       ("autoencoder", lambda: w.fit_autoencoder(loader)), ("transfer", lambda: w.fit_transfer(loader)),
                       ("finetune", lambda: w.fit_finetune(loader)), ("evaluate", lambda: w.evaluate(loader))):
        seen.clear()
        run()
        stages[stage] = set(seen)
    assert stages == {s: {expect} for s in stages}
    assert all(p.dtype == torch.float32 for p in w.model.parameters())


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
