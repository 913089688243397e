"""EncodeNet for timm classifiers: a converting autoencoder makes a classifier more accurate at the same size.

Importing the package also registers its CIFAR model zoo (``resnet20_cifar`` ...) in timm.
"""
from . import models  # noqa: F401  (registers the CIFAR zoo in timm)
from .compare import CompareResult, compare
from .compat import check_model
from .config import AutoencoderConfig, DecoderConfig, EncodeNetConfig, RepresentativesConfig, StageConfig
from .errors import EncodeNetError, Interrupted, NonFiniteLossError, RankLostError, UnsupportedModelError
from .feature_store import FeatureStore
from .representatives import Representatives
from .wrapper import EncodeNetWrapper

__version__ = "0.1.0"

__all__ = [
    "EncodeNetWrapper",
    "EncodeNetConfig",
    "StageConfig",
    "AutoencoderConfig",
    "RepresentativesConfig",
    "DecoderConfig",
    "Representatives",
    "FeatureStore",
    "check_model",
    "compare",
    "CompareResult",
    "EncodeNetError",
    "UnsupportedModelError",
    "NonFiniteLossError",
    "Interrupted",
    "RankLostError",
    "__version__",
]
