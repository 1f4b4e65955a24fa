"""The data section of a run's configuration (JSON), as dataclasses.

Example (``{"data": {...}}`` or the section alone)::

    {"synthetic": {"root": "data/synthetic", "preset": "default", "seed": 0},
     "sampler": "uniform", "batch_size": 4,
     "min_size": 64, "max_size": 96, "hflip": 0.5}

or with real datasets instead of the synthetic mixture::

    {"datasets": [{"name": "voc", "train": "voc/train.json", "val": "voc/val.json",
                   "img_dir": "voc/images"}]}

Relative paths are resolved against the config file's folder. Unknown keys are
errors naming the key and the file (:class:`ConfigError`).
"""
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import List, Optional


class ConfigError(ValueError):
    """A configuration file is malformed (message names the file and the key)."""


@dataclass
class DatasetConfig:
    name: str
    train: str
    val: str
    img_dir: str
    val_img_dir: Optional[str] = None  # defaults to img_dir


@dataclass
class SyntheticConfig:
    root: str = "data/synthetic"
    preset: str = "default"
    seed: int = 0


@dataclass
class DataConfig:
    datasets: List[DatasetConfig] = field(default_factory=list)  # empty -> synthetic
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    sampler: str = "proportional"  # proportional | uniform | weighted
    weights: Optional[List[float]] = None
    batch_size: int = 4
    min_size: int = 64
    max_size: int = 96
    multiscale: List[int] = field(default_factory=list)
    hflip: float = 0.5
    normalize: bool = True
    merge_labels_by_name: bool = True
    seed: int = 0


def _type_ok(value, tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, List):
        (inner,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _build(cls, data, where, source):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'top level'} must be an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {(where + '.' if where else '') + key!r}; "
                              f"known keys: {sorted(fields)}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        path = (where + "." if where else "") + key
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path, source)
        elif typing.get_origin(tp) in (list, List) and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            if not isinstance(value, list):
                raise ConfigError(f"{source}: {path!r} must be a list")
            kwargs[key] = [_build(typing.get_args(tp)[0], v, f"{path}[{i}]", source)
                           for i, v in enumerate(value)]
        elif not _type_ok(value, tp):
            raise ConfigError(f"{source}: key {path!r} has the wrong type: {value!r}")
        else:
            kwargs[key] = value
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: {where or 'top level'} is missing required keys {missing}")
    return cls(**kwargs)


def data_config_from_dict(data, source="<dict>"):
    """Build and check a :class:`DataConfig` from a dict (``source`` names it in errors)."""
    cfg = _build(DataConfig, data, "", source)
    if cfg.sampler not in ("proportional", "uniform", "weighted"):
        raise ConfigError(f"{source}: key 'sampler' must be proportional, uniform or weighted, got {cfg.sampler!r}")
    if (cfg.sampler == "weighted") != (cfg.weights is not None):
        raise ConfigError(f"{source}: key 'weights' is required with sampler 'weighted' and only then")
    if cfg.batch_size <= 0 or cfg.min_size <= 0 or cfg.max_size < cfg.min_size:
        raise ConfigError(f"{source}: batch_size and min_size must be positive, max_size >= min_size")
    return cfg


def read_json_config(path):
    """The parsed JSON of a config file; ConfigError naming the file when it is missing
    or malformed."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def load_data_config(path, section="data"):
    """Read a JSON config file; use its ``section`` key if present, else the whole object."""
    path = os.fspath(path)
    data = read_json_config(path)
    if isinstance(data, dict) and section and section in data:
        data = data[section]
    cfg = data_config_from_dict(data, source=path)
    base = os.path.dirname(os.path.abspath(path))
    resolve = lambda p: p if p is None or os.path.isabs(p) else os.path.join(base, p)  # noqa: E731
    cfg.synthetic.root = resolve(cfg.synthetic.root)
    for d in cfg.datasets:
        d.train, d.val, d.img_dir, d.val_img_dir = map(resolve, (d.train, d.val, d.img_dir, d.val_img_dir))
    return cfg


def build_mixture(cfg, split="train", transforms=None, verify_images=False, label_space=None):
    """The :class:`~damex.data.mixture.MixtureDataset` of ``cfg`` for ``split`` ("train" or "val").

    With no ``datasets`` configured, writes (or reuses) the synthetic mixture
    at ``cfg.synthetic.root``. ``transforms`` default to
    :func:`~damex.data.transforms.default_transforms` for the split. Pass the
    train mixture's ``label_space`` when building "val" to share it.
    """
    from .coco import CocoDetection
    from .mixture import MixtureDataset
    from .synthetic import make_mixture
    from .transforms import default_transforms

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if transforms is None:
        transforms = default_transforms(split == "train", cfg.min_size, cfg.max_size, cfg.hflip,
                                        cfg.normalize, cfg.seed, cfg.multiscale)
    if cfg.datasets:
        specs = [(d.name, getattr(d, split), (d.val_img_dir or d.img_dir) if split == "val" else d.img_dir)
                 for d in cfg.datasets]
    else:
        desc = make_mixture(cfg.synthetic.root, seed=cfg.synthetic.seed, preset=cfg.synthetic.preset)
        specs = [(d["name"], d[split], d["img_dir"]) for d in desc["datasets"]]
    datasets = [CocoDetection(name, ann, img, transforms=transforms, dataset_id=i,
                              verify_images=verify_images)
                for i, (name, ann, img) in enumerate(specs)]
    return MixtureDataset(datasets, label_space=label_space, merge_by_name=cfg.merge_labels_by_name)
