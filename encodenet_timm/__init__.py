"""EncodeNet for timm classifiers: a converting autoencoder makes a classifier more accurate at the same size.

Importing the package also registers its CIFAR model zoo (``resnet20_cifar`` ...) in timm.
"""
from . import models  # noqa: F401  (registers the CIFAR zoo in timm)
from .compare import CompareResult, compare
from .compat import check_model
from .config import (AutoencoderConfig, DataConfig, DecoderConfig, EncodeNetConfig, RepresentativesConfig,
                     StageConfig)
from .errors import (DataError, EncodeNetError, Interrupted, NonFiniteLossError, RankLostError,
                     UnsupportedModelError)
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
    "DataConfig",
    "Representatives",
    "FeatureStore",
    "check_model",
    "compare",
    "CompareResult",
    "EncodeNetError",
    "UnsupportedModelError",
    "NonFiniteLossError",
    "DataError",
    "Interrupted",
    "RankLostError",
    "__version__",
]
