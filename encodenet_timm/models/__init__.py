"""CIFAR model zoo, registered into timm's model registry on import.

``import encodenet_timm.models`` makes every name below available to ``timm.create_model`` /
``timm.list_models``; the names do not collide with timm's own.
"""
from .resnet_cifar import resnet20_cifar, resnet32_cifar, resnet50_cifar, resnet56_cifar, resnet110_cifar
from .vgg_cifar import vgg8_bn_cifar, vgg11_bn_cifar, vgg13_bn_cifar, vgg16_bn_cifar

__all__ = [
    'resnet20_cifar',
    'resnet32_cifar',
    'resnet56_cifar',
    'resnet110_cifar',
    'resnet50_cifar',
    'vgg8_bn_cifar',
    'vgg11_bn_cifar',
    'vgg13_bn_cifar',
    'vgg16_bn_cifar',
]
