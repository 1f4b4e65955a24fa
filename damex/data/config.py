"""The configuration schema: the data section of a run's configuration, and the
checking code every section (``model``, ``data``, ``train``) goes through.

Example (``{"data": {...}}`` or the section alone)::

    {"synthetic": {"root": "data/synthetic", "preset": "default", "seed": 0},
     "sampler": "uniform", "batch_size": 4,
     "min_size": 64, "max_size": 96, "hflip": 0.5}

or with real datasets instead of the synthetic mixture::

    {"datasets": [{"name": "voc", "train": "voc/train.json", "val": "voc/val.json",
                   "img_dir": "voc/images"}]}

Relative paths are resolved against the config file's folder. Every key has a
type and, where it matters, a range (a dataclass field's ``metadata["check"]``);
:func:`build_section` checks both and raises :class:`ConfigError` naming the
file, the key (with its section prefix) and, for an unknown key, the known keys.
"""
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import List, Optional


class ConfigError(ValueError):
    """A configuration file is malformed (message names the file and the key)."""


# -- range rules: a callable value -> None (fine) or a phrase saying what is wanted ----------

def at_least(lo):
    return lambda v: None if v >= lo else f"must be >= {lo}"


def between(lo, hi):
    return lambda v: None if lo <= v <= hi else f"must be in [{lo}, {hi}]"


def one_of(*choices):
    return lambda v: None if v in choices else f"must be one of {list(choices)}"


def each(rule):
    """A rule applied to every element of a list."""
    def check(values):
        for i, v in enumerate(values):
            bad = rule(v)
            if bad:
                return f"[{i}] = {v!r} {bad}"
        return None
    return check


def rule(check, default=dataclasses.MISSING, default_factory=dataclasses.MISSING):
    """A dataclass field with a range rule (``metadata["check"]``)."""
    kw = {"default": default} if default_factory is dataclasses.MISSING else {"default_factory": default_factory}
    return field(metadata={"check": check}, **kw)


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
    sampler: str = rule(one_of("proportional", "uniform", "weighted"), "proportional")
    weights: Optional[List[float]] = rule(each(at_least(0.0)), None)
    batch_size: int = rule(at_least(1), 4)
    min_size: int = rule(at_least(1), 64)
    max_size: int = rule(at_least(1), 96)
    multiscale: List[int] = rule(each(at_least(1)), default_factory=list)
    hflip: float = rule(between(0.0, 1.0), 0.5)
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
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {float: "a finite number", int: "an integer", str: "a string", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def check_value(value, tp, check, path, source):
    """Check one value's type and range; ConfigError naming ``source`` and ``path``."""
    if not _type_ok(value, tp):
        raise ConfigError(f"{source}: key {path!r} has the wrong type: {value!r} "
                          f"(expected {_type_name(tp)})")
    if check is not None and value is not None:
        bad = check(value)
        if bad:
            raise ConfigError(f"{source}: key {path!r} = {value!r} {bad}")


def known_keys(cls):
    return sorted(f.name for f in dataclasses.fields(cls))


def build_section(cls, data, where, source):
    """Build dataclass ``cls`` from a dict, checking names, types and ranges.

    ``where`` is the key prefix in messages ("train", "data.synthetic", "" for the top).
    """
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
            kwargs[key] = build_section(tp, value, path, source)
        elif typing.get_origin(tp) in (list, List) and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            if not isinstance(value, list):
                raise ConfigError(f"{source}: {path!r} must be a list")
            kwargs[key] = [build_section(typing.get_args(tp)[0], v, f"{path}[{i}]", source)
                           for i, v in enumerate(value)]
        else:
            check_value(value, tp, fields[key].metadata.get("check"), path, source)
            kwargs[key] = value
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: {where or 'top level'} is missing required keys {missing}")
    return cls(**kwargs)


def data_config_from_dict(data, source="<dict>", where=""):
    """Build and check a :class:`DataConfig` from a dict (``source`` names it in errors,
    ``where`` is the key prefix, "data" inside a run config)."""
    cfg = build_section(DataConfig, data, where, source)
    pre = where + "." if where else ""
    if (cfg.sampler == "weighted") != (cfg.weights is not None):
        raise ConfigError(f"{source}: key {pre + 'weights'!r} is required with sampler 'weighted' and only then")
    if cfg.max_size < cfg.min_size:
        raise ConfigError(f"{source}: key {pre + 'max_size'!r} = {cfg.max_size} must be >= "
                          f"{pre}min_size ({cfg.min_size})")
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
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (JSON) file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def resolve_data_paths(data, base):
    """Make the relative paths of a raw data section (dict) absolute against ``base``, in place."""
    if not isinstance(data, dict):
        return data
    resolve = lambda p: p if not isinstance(p, str) or os.path.isabs(p) else os.path.join(base, p)  # noqa: E731
    syn = data.get("synthetic")
    if isinstance(syn, dict) and "root" in syn:
        syn["root"] = resolve(syn["root"])
    datasets = data.get("datasets")
    for d in datasets if isinstance(datasets, list) else []:
        if isinstance(d, dict):
            for k in ("train", "val", "img_dir", "val_img_dir"):
                if k in d:
                    d[k] = resolve(d[k])
    return data


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
