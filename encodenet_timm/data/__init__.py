"""The command line's datasets; `EncodeNetWrapper` takes `DataLoader`s and never needs this subpackage.

* `registry`: the dataset names (`DATASETS`), `build_datasets` -> `DataSplits`, and their loaders.
* `cifar`: CIFAR-10/100 and the CIFAR-10 JPEG zip as uint8 arrays; `CifarDataset` augments them.
* `digits`: scikit-learn's handwritten digits (no download), for examples and tests.
* `imagefolder`: your own ``train/<class>/<image>`` folders.
* `splits`: stratified subsets, validation hold-outs and `denormalize`, shared by all of them.
"""
from .cifar import CIFAR_DATASETS, CIFAR_STATS, CifarArrays, CifarDataset, load_cifar, read_image_zip
from .digits import digits_datasets, digits_images, digits_splits
from .registry import DATA_CONFIG_KEYS, DATASETS, RESIZE, DataSplits, build_datasets, make_loaders
from .splits import denormalize, stratified_subset, train_val_split

__all__ = ["DATASETS", "RESIZE", "DATA_CONFIG_KEYS", "DataSplits", "build_datasets", "make_loaders",
           "CIFAR_DATASETS", "CIFAR_STATS", "CifarArrays", "CifarDataset", "load_cifar", "read_image_zip",
           "digits_datasets", "digits_images", "digits_splits", "denormalize", "stratified_subset",
           "train_val_split"]
