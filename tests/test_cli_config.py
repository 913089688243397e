"""``encodenet config``: the dump, merged from a file and flags, and bad overrides (`encodenet_timm.cli.config`)."""
import pytest

from encodenet_timm import EncodeNetConfig

from conftest import run


def test_config_dump_round_trips(capsys):
    code, out, _ = run(capsys, "config", "--dump")
    assert code == 0
    assert EncodeNetConfig.from_yaml(out) == EncodeNetConfig()
    assert out == EncodeNetConfig().to_yaml()



def test_config_dump_merges_file_and_flags(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("transfer:\n  lr: 0.2\n  epochs: 4\nseed: 3\n")
    code, out, _ = run(capsys, "config", "--dump", "--config", path, "--transfer.epochs", "7",
                       "--set", "autoencoder.lr=1e-4", "-o", "representatives.clusters_per_class=auto",
                       "--input_size", "[1, 28, 28]")
    assert code == 0
    config = EncodeNetConfig.from_yaml(out)
    assert config.seed == 3 and config.transfer.lr == 0.2 and config.transfer.epochs == 7
    assert config.autoencoder.lr == 1e-4 and config.representatives.clusters_per_class == "auto"
    assert config.input_size == (1, 28, 28)



@pytest.mark.parametrize("item, message", [("transfer.lrr=0.1", "transfer.lrr"),
                                           ("nope.lr=0.1", "nope.lr"),
                                           ("transfer.lr=fast", "transfer.lr"),
                                           ("transfer.lr", "KEY=VALUE")])
def test_bad_override_exits_2(capsys, tmp_path, item, message):
    for argv in (["config", "--dump", "--set", item],
                 ["fit", "--model", "resnet20_cifar", "--dataset", "digits", "--out", tmp_path / "r", "--set", item]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and message in err and "Traceback" not in err
        assert not (tmp_path / "r").exists()

