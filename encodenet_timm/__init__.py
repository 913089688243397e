"""EncodeNet (Mahmud et al. 2024) for timm classifiers, and a measure of whether it helps.

`EncodeNetWrapper` runs the method on any timm image classifier: per-class representatives, a converting
autoencoder that trains the encoder to map each image to its representative, then the head (and a
fine-tune) retrained; `export()` hands back a plain timm model of the same class and size. The paper says
this makes a classifier more accurate at the same size; `compare` measures whether it does for your model
and data, against same-size controls given the same extra compute, and returns the model that won.

Importing the package also registers its CIFAR model zoo (``resnet20_cifar`` ...) in timm.
"""
from . import models  # noqa: F401  (registers the CIFAR zoo in timm)
from .compare import CompareResult, compare
from .compat import check_model
from .config import (AutoencoderConfig, ControlsConfig, DataConfig, DecoderConfig, EncodeNetConfig,
                     RepresentativesConfig, StageConfig)
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
    "ControlsConfig",
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
