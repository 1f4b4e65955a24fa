"""COCO-format datasets, transforms, the mixture sampler and the embedded synthetic mixture.

Pure Python (numpy + Pillow); nothing here downloads anything.
"""
from .coco import CocoDetection, DatasetError, load_coco_json, read_image
from .config import ConfigError, DataConfig, DatasetConfig, SyntheticConfig, build_mixture, \
    data_config_from_dict, load_data_config
from .mixture import LabelSpace, MixtureDataset, MixtureSampler, collate, iterate_batches
from .synthetic import make_mixture
from . import transforms

__all__ = ["CocoDetection", "DatasetError", "load_coco_json", "read_image", "ConfigError",
           "DataConfig", "DatasetConfig", "SyntheticConfig", "build_mixture",
           "data_config_from_dict", "load_data_config", "LabelSpace", "MixtureDataset",
           "MixtureSampler", "collate", "iterate_batches", "make_mixture", "transforms"]
