"""encodenet_timm.config: the configs' own rules (shorthands, range checks, names timm must know); what every
config shares (YAML, dotted keys, types) is tested in test_config_io.py."""
import pytest

from encodenet_timm import EncodeNetConfig


def test_baseline_epochs_shorthand():
    cfg = EncodeNetConfig()
    assert cfg.baseline_epochs == 0
    cfg.baseline_epochs = 4
    assert cfg.baseline.epochs == 4


@pytest.mark.parametrize("key, value, says", [
    ("transfer.clip_grad", -1.0, "'transfer.clip_grad' must be > 0"),
    ("baseline.lr", 0.0, "'baseline.lr' must be a finite number > 0"),
    ("finetune.smoothing", 1.0, "'finetune.smoothing' must be in [0, 1)"),
    ("transfer.warmup_epochs", 11, "'transfer.warmup_epochs' must be in [0, transfer.epochs=10]"),
    ("autoencoder.epochs", -1, "'autoencoder.epochs' must be >= 0"),
    ("autoencoder.ce_weight", -0.5, "'autoencoder.ce_weight' must be >= 0"),
    ("amp", "fp8", "'amp' must be one of"),
    ("decoder.width", 0.0, "'decoder.width' must be > 0"),
    ("representatives.clusters_per_class", 0, "'representatives.clusters_per_class' must be an int >= 1 or 'auto'"),
    ("representatives.faiss_gpu", "yes", "'representatives.faiss_gpu' must be one of"),
])
def test_every_range_is_checked_with_its_dotted_key(key, value, says):
    with pytest.raises(ValueError) as info:
        EncodeNetConfig().override({key: value})
    assert says in str(info.value) and repr(value) in str(info.value)


def test_optimizer_and_scheduler_names_are_checked_before_any_stage(digits_loaders):
    import timm
    from encodenet_timm import EncodeNetWrapper
    cfg = EncodeNetConfig()
    cfg.transfer.opt = "sgdd"  # the last stage: found before the baseline or the autoencoder run
    with pytest.raises(ValueError, match="'transfer.opt': timm has no optimizer 'sgdd'; did you mean sgd"):
        EncodeNetWrapper(timm.create_model("resnet20_cifar"), cfg)
    cfg.transfer.opt, cfg.finetune.sched = "lookahead_adamw", "cosinus"
    with pytest.raises(ValueError, match="'finetune.sched' must be one of"):
        EncodeNetWrapper(timm.create_model("resnet20_cifar"), cfg)
