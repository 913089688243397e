"""pytest plugin: run timm's own ``tests/test_models.py`` on the encodenet_timm CIFAR zoo only.

Load it with ``-p timm_tests_plugin`` (this folder on ``PYTHONPATH``, the repository root too). Plugins load
before test modules are collected, so the import below registers the zoo before timm's test module
parametrizes over ``timm.list_models(...)`` at import time. Collection then keeps only the items whose
``model_name`` parameter is a zoo model; everything else (timm's ~1,400 built-in models, and tests without a
``model_name``) is deselected and reported as such.
"""
import encodenet_timm.models as zoo

ZOO_NAMES = frozenset(zoo.__all__)


def _model_name(item):
    callspec = getattr(item, 'callspec', None)
    name = callspec.params.get('model_name') if callspec is not None else None
    return name.split('.')[0] if isinstance(name, str) else None  # drop a pretrained tag, if any


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if _model_name(item) in ZOO_NAMES]
    drop = [item for item in items if _model_name(item) not in ZOO_NAMES]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_report_header(config):
    return f'encodenet_timm zoo models under test: {", ".join(sorted(ZOO_NAMES))}'
