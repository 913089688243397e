"""encodenet_timm.config_io: the round trip through dicts and YAML, dotted overrides, strict attributes
and type checks every config shares (exercised on `EncodeNetConfig`)."""
import pytest
import yaml

from encodenet_timm import EncodeNetConfig, StageConfig


def test_yaml_round_trip_of_defaults_and_changes(tmp_path):
    cfg = EncodeNetConfig()
    assert EncodeNetConfig.from_yaml(cfg.to_yaml()) == cfg
    cfg = EncodeNetConfig(seed=3, input_size=(1, 28, 28), baseline=StageConfig(epochs=7, lr=0.2))
    cfg.representatives.clusters_per_class = "auto"
    cfg.transfer.clip_grad = 1.5
    path = tmp_path / "run.yaml"
    cfg.to_yaml(path)
    back = EncodeNetConfig.from_yaml(path)
    assert back == cfg and back.input_size == (1, 28, 28) and back.baseline_epochs == 7
    assert yaml.safe_load(path.read_text())["baseline"]["epochs"] == 7  # plain YAML, no tags


def test_partial_yaml_keeps_defaults():
    cfg = EncodeNetConfig.from_yaml("transfer:\n  lr: 0.1\n")
    assert cfg.transfer.lr == 0.1 and cfg.transfer.epochs == EncodeNetConfig().transfer.epochs


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="'transfer.lrr'.*transfer.lr"):
        EncodeNetConfig.from_yaml("transfer:\n  lrr: 0.1\n")
    with pytest.raises(ValueError, match="'colour'"):
        EncodeNetConfig.from_dict({"colour": 1})


@pytest.mark.parametrize("text, key", [
    ("seed: one\n", "seed"), ("transfer:\n  epochs: 1.5\n", "transfer.epochs"),
    ("channels_last: 1\n", "channels_last"), ("input_size: [3, 32]\n", "input_size"),
    ("baseline: 3\n", "baseline"), ("representatives:\n  clusters_per_class: [1]\n", "representatives.clusters_per_class"),
])
def test_wrong_types_are_rejected(text, key):
    with pytest.raises(ValueError, match=key):
        EncodeNetConfig.from_yaml(text)


def test_int_accepted_for_float_and_override():
    cfg = EncodeNetConfig.from_dict({"transfer": {"lr": 1}})
    assert isinstance(cfg.transfer.lr, float)
    cfg2 = cfg.override({"autoencoder.epochs": 2, "seed": 5})
    assert cfg2.autoencoder.epochs == 2 and cfg2.seed == 5 and cfg.seed == 0
    with pytest.raises(ValueError, match="unknown config key"):
        cfg.override({"autoencoder.epoch": 2})


def test_an_attribute_a_config_does_not_have_is_an_error():
    cfg = EncodeNetConfig()
    with pytest.raises(AttributeError, match="no option 'epoch'; did you mean 'epochs'"):
        cfg.baseline.epoch = 3
    with pytest.raises(AttributeError, match="no option 'sead'"):
        cfg.sead = 1
    cfg.baseline_epochs = 4  # a property, not a typo
    assert cfg.baseline.epochs == 4


def test_type_errors_name_the_allowed_values():
    with pytest.raises(ValueError, match="'transfer.clip_grad' must be a number or null, got 'big'"):
        EncodeNetConfig().override({"transfer.clip_grad": "big"})
    with pytest.raises(ValueError, match="'input_size' must be a list of 3 ints or null"):
        EncodeNetConfig().override({"input_size": [3, 32]})
