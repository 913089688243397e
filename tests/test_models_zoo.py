"""The CIFAR zoo (encodenet_timm.models) against timm's model contract and the literature's sizes."""
import sys

import numpy as np
import pytest
import timm
import torch

import encodenet_timm.models as zoo

ZOO = [
    'resnet20_cifar', 'resnet32_cifar', 'resnet56_cifar', 'resnet110_cifar', 'resnet50_cifar',
    'vgg8_bn_cifar', 'vgg11_bn_cifar', 'vgg13_bn_cifar', 'vgg16_bn_cifar',
]

# Parameter counts for 10 classes as published: He et al. 2016 (table 6), RepDistiller / kuangliu.
LITERATURE_PARAMS = {
    'resnet20_cifar': 0.27e6,
    'resnet32_cifar': 0.46e6,
    'resnet56_cifar': 0.85e6,
    'resnet110_cifar': 1.7e6,
    'resnet50_cifar': 23.5e6,
    'vgg16_bn_cifar': 14.7e6,
}

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _create(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs)


def _images(batch_size=2, size=32):
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))  # (B, 3, H, W)


def test_all_lists_the_zoo():
    assert sorted(zoo.__all__) == sorted(ZOO)


@pytest.mark.parametrize('name', ZOO)
def test_registered_by_us_without_colliding_with_timm(name):
    assert timm.is_model(name)
    assert timm.models.model_entrypoint(name).__module__.startswith('encodenet_timm.models.')
    # A built-in timm model of the same name would be an entry point in one of timm's model modules (all
    # imported by `import timm`); our registration would have silently replaced it.
    timm_modules = [m for n, m in list(sys.modules.items()) if n.startswith('timm.models.') and m is not None]
    assert not [m.__name__ for m in timm_modules if callable(getattr(m, name, None))]


@pytest.mark.parametrize('name', ZOO)
def test_pretrained_cfg_is_cifar_and_has_no_weights(name):
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.input_size == (3, 32, 32)
    assert cfg.num_classes == 10
    assert cfg.mean == CIFAR_MEAN and cfg.std == CIFAR_STD
    assert not cfg.has_weights  # no url / hub id / file: timm never downloads
    assert name not in timm.list_models(pretrained=True)


@pytest.mark.parametrize('name', ZOO)
def test_forward_contract(name):
    model = _create(name, num_classes=10).eval()
    x = _images()
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        head_out = model.forward_head(feats)
    assert out.shape == (2, 10)
    assert feats.ndim == 4 and feats.shape[:2] == (2, model.num_features)
    assert feats.shape[-2:] == model.pretrained_cfg['pool_size']
    assert pre.shape == (2, model.num_features) == (2, model.head_hidden_size)
    torch.testing.assert_close(head_out, out)
    assert model.get_classifier() is model.fc
    assert model.num_classes == 10

    model.reset_classifier(100)
    with torch.no_grad():
        assert model(x).shape == (2, 100)
    assert model.num_classes == 100

    model.reset_classifier(0, '')
    with torch.no_grad():
        assert model(x).shape == feats.shape


@pytest.mark.parametrize('name', ['resnet20_cifar', 'vgg8_bn_cifar'])
def test_num_classes_100_via_create_model(name):
    model = _create(name, num_classes=100).eval()
    with torch.no_grad():
        assert model(_images()).shape == (2, 100)
    assert model.fc.out_features == 100


@pytest.mark.parametrize('name', sorted(LITERATURE_PARAMS))
def test_parameter_count_matches_literature(name):
    model = _create(name, num_classes=10)
    num_params = sum(p.numel() for p in model.parameters())
    assert num_params == pytest.approx(LITERATURE_PARAMS[name], rel=0.03)


@pytest.mark.parametrize('name', ZOO)
def test_features_only_matches_feature_info(name):
    info = _create(name).feature_info
    model = _create(name, features_only=True).eval()
    assert model.feature_info.channels() == [fi['num_chs'] for fi in info]
    assert model.feature_info.reduction() == [fi['reduction'] for fi in info]
    with torch.no_grad():
        maps = model(_images())
    assert len(maps) == len(info) >= 3
    for fmap, fi in zip(maps, info):
        assert fmap.shape == (2, fi['num_chs'], 32 // fi['reduction'], 32 // fi['reduction'])


@pytest.mark.parametrize('name', ['resnet20_cifar', 'resnet50_cifar', 'vgg11_bn_cifar'])
def test_forward_intermediates_and_getter_features(name):
    model = _create(name).eval()
    x = _images()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        last_two = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)
    assert [t.shape[1] for t in inter] == [fi['num_chs'] for fi in model.feature_info]
    assert [t.shape for t in last_two] == [t.shape for t in inter[-2:]]

    getter = _create(name, features_only=True, feature_cls='getter', out_indices=(1, 2)).eval()
    with torch.no_grad():
        maps = getter(x)
    assert [m.shape for m in maps] == [inter[1].shape, inter[2].shape]

    with pytest.raises(ValueError, match='NCHW'):
        model.forward_intermediates(x, output_fmt='NHWC')


@pytest.mark.parametrize('name', ['resnet20_cifar', 'vgg8_bn_cifar'])
def test_grad_checkpointing_keeps_output(name):
    model = _create(name).eval()
    x = _images()
    with torch.no_grad():
        expected = model(x)
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize('name', ['resnet20_cifar', 'vgg8_bn_cifar'])
def test_group_matcher_covers_every_parameter(name):
    model = _create(name)
    groups = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    grouped = [p for names in groups.values() for p in names]
    assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())
    assert model.get_classifier(name_only=True) == 'fc'


def test_bad_layouts_raise_value_error():
    from encodenet_timm.models.resnet_cifar import CifarResNet
    from encodenet_timm.models.vgg_cifar import CifarVgg

    with pytest.raises(ValueError, match='one entry per stage'):
        CifarResNet(layers=(3, 3), channels=(16, 32, 64))
    with pytest.raises(ValueError, match='5 non-empty stages'):
        CifarVgg(cfg=((64,), (128,)))


_HEAVY = {'resnet32_cifar', 'resnet50_cifar', 'resnet110_cifar', 'vgg16_bn_cifar', 'vgg13_bn_cifar', 'vgg11_bn_cifar', 'resnet56_cifar',
          'vgg8_bn_cifar'}  # the default run keeps resnet20_cifar


@pytest.mark.parametrize('name', [
    pytest.param(n, marks=pytest.mark.slow) if n in _HEAVY else n for n in ZOO])
def test_full_encodenet_fit_on_real_digits(name, digits):
    """Every zoo model goes through all EncodeNet stages on a small real subset (the heavy ones under -m slow)."""
    from torch.utils.data import DataLoader, Subset
    from encodenet_timm import EncodeNetConfig, EncodeNetWrapper
    train, test = digits
    cfg = EncodeNetConfig(progress=False, device='cpu', input_size=(3, 32, 32))
    cfg.baseline.epochs = cfg.autoencoder.epochs = cfg.transfer.epochs = cfg.finetune.epochs = 1
    cfg.representatives.clusters_per_class = 2
    model = timm.create_model(name, pretrained=False, num_classes=10)
    wrapper = EncodeNetWrapper(model, cfg)
    loader = DataLoader(Subset(train, range(160)), batch_size=40, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    history = wrapper.fit(loader, DataLoader(Subset(test, range(80)), batch_size=80))
    assert all(np.isfinite(h['loss']) for stage in ('baseline', 'autoencoder', 'transfer') for h in history[stage])
    assert wrapper.flops()['ratio'] <= 1.0
    plain = wrapper.export()
    assert type(plain) is type(model)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in model.parameters())
