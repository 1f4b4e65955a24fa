"""A run's configuration: ``{"model": {...}, "data": {...}, "train": {...}}`` in JSON.

One schema, checked by one piece of code
(:func:`~damex.data.config.build_section`): every key of every section has a
type and, where it matters, a range; errors are :class:`ConfigError` naming the
file and the key with its section prefix (``train.steps``), and an unknown key
lists the known ones.

* ``model``: ``preset`` ("tiny" or "paper") and any
  :class:`~damex.models.dino.DINOConfig` field to override (types and ranges in
  :data:`MODEL_RULES`, cross-field rules in :func:`check_model`);
* ``data``: :class:`~damex.data.config.DataConfig`;
* ``train``: :class:`TrainConfig`.

A file may start from another: ``"base": "other.json"`` (relative to the file)
is read first and the file's sections are merged over it key by key.
:func:`apply_overrides` sets keys from the command line (``train.lr=1e-4``).

Paths: data paths resolve against the folder of the file that sets them;
``train.out_dir`` against the working directory at the time the run is created,
and is stored absolute (a resume from elsewhere continues the same folder).
"""
import copy
import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass
from typing import List, Optional

from ..data.config import (ConfigError, DataConfig, at_least, between, build_section, check_value,
                           data_config_from_dict, each, one_of, read_json_config, resolve_data_paths,
                           rule)
from ..models.dino import PRESETS, DINOConfig
from ..routing import DAMEX_WEIGHT, MODES

TOP_LEVEL = ("model", "data", "train")


@dataclass
class TrainConfig:
    """The ``train`` section.

    ``steps`` is the step to train until; ``lr_drop`` the steps at which the learning
    rates are multiplied by ``lr_gamma``; ``checkpoint_every`` / ``keep_last`` the
    numbered checkpoints (0 = only at the end / keep all); ``eval_every`` validates on
    the val split (0 = never) and keeps ``best.npz``; ``threads`` None or 0 = the
    measured default of :func:`default_threads`.
    """
    steps: int = rule(at_least(1), 2000)
    lr: float = rule(at_least(0.0), 4e-4)
    lr_backbone: float = rule(at_least(0.0), 4e-4)
    weight_decay: float = rule(at_least(0.0), 1e-4)
    clip_max_norm: float = rule(at_least(0.0), 0.1)                   # 0 = no clipping
    lr_drop: List[int] = rule(each(at_least(1)), default_factory=list)  # steps at which lr *= lr_gamma
    lr_gamma: float = rule(at_least(0.0), 0.1)
    routing_weight: float = rule(at_least(0.0), DAMEX_WEIGHT)
    log_every: int = rule(at_least(0), 20)
    checkpoint_every: int = rule(at_least(0), 500)                    # 0 = only at the end
    keep_last: int = rule(at_least(0), 3)                             # numbered checkpoints kept; 0 = all
    eval_every: int = rule(at_least(0), 0)                            # validate every N steps; 0 = never
    out_dir: str = "runs/tiny"
    tensorboard: bool = False                                         # event files in out_dir/tensorboard
    seed: int = 0
    threads: Optional[int] = rule(lambda v: None if v == 0 or 1 <= v <= 512
                                  else "must be in [1, 512] (or 0 / absent for the default)", None)
    nonfinite: str = rule(one_of("stop", "skip"), "stop")   # NaN/inf loss or gradients: stop, or skip the batch
    nonfinite_max_skips: int = rule(at_least(0), 10)       # with "skip": stop at the next bad batch after this many
    # under mpiexec: "data" replicates the model; "data+experts" shards each MoE layer's experts
    # over groups of expert_ranks ranks (0 / absent = all ranks), data parallel across the groups
    parallel: str = rule(one_of("data", "data+experts"), "data")
    expert_ranks: int = rule(at_least(0), 0)


# model keys: DINOConfig's fields; tuples are lists of integers in JSON
MODEL_RULES = {
    "num_classes": at_least(1), "d_model": at_least(1), "d_ffn": at_least(1), "n_heads": at_least(1),
    "n_points": at_least(1), "enc_layers": at_least(1), "dec_layers": at_least(1),
    "num_queries": at_least(1), "num_feature_levels": between(1, 8),
    "backbone_depths": each(at_least(1)), "backbone_widths": each(at_least(1)),
    "backbone_block": one_of("basic", "bottleneck"),
    "stem_width": at_least(1), "train_backbone_layers": each(between(0, 4)), "routing": one_of(*MODES),
    "moe_decoder_layers": each(at_least(0)), "moe_encoder_layers": each(at_least(0)),
    "num_experts": at_least(1), "moe_hidden": at_least(1), "moe_k": at_least(1),
    "capacity_factor": at_least(0.0), "capacity_sizing": one_of("uniform", "composition"),
    "eval_capacity_factor": at_least(0.0), "gate_noise": at_least(0.0), "drop_path": between(0.0, 1.0),
    "dataset_to_expert": each(at_least(0)), "dn_number": at_least(0),
    "dn_label_noise_ratio": between(0.0, 1.0), "dn_box_noise_scale": at_least(0.0),
}


def _model_type(key):
    """The JSON type of a model key: DINOConfig's annotation, tuples as lists of
    integers, Optional when the annotation or the default says so."""
    tp = typing.get_type_hints(DINOConfig)[key]
    if tp is tuple:
        tp = List[int]
    return Optional[tp] if getattr(PRESETS["tiny"], key) is None else tp


def check_model(data, source, where="model"):
    """Check a raw model section; returns ``(preset name, overrides with tuples)``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be an object, got {type(data).__name__}")
    data = dict(data)
    name = data.pop("preset", "tiny")
    if name not in PRESETS:
        raise ConfigError(f"{source}: key '{where}.preset' = {name!r} must be one of {sorted(PRESETS)}")
    base = PRESETS[name]
    known = sorted(["preset"] + [f.name for f in dataclasses.fields(DINOConfig)])
    for key, value in data.items():
        if not hasattr(base, key):
            raise ConfigError(f"{source}: unknown key '{where}.{key}'; known keys: {known}")
        check_value(value, _model_type(key), MODEL_RULES.get(key), f"{where}.{key}", source)
    over = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    cfg = DINOConfig(**{**base.__dict__, **over})
    err = lambda key, msg: ConfigError(f"{source}: key '{where}.{key}' {msg}")  # noqa: E731
    for key, n in (("moe_decoder_layers", cfg.dec_layers), ("moe_encoder_layers", cfg.enc_layers)):
        bad = [i for i in getattr(cfg, key) if i >= n]
        if bad:
            raise err(key, f"= {list(getattr(cfg, key))}: layers {bad} do not exist "
                           f"({key[4:7]}_layers = {n}, so indices 0..{n - 1})")
    if any(e >= cfg.num_experts for e in cfg.dataset_to_expert):
        raise err("dataset_to_expert", f"= {list(cfg.dataset_to_expert)}: experts are 0.."
                                       f"{cfg.num_experts - 1} (num_experts = {cfg.num_experts})")
    if cfg.moe_k > cfg.num_experts:
        raise err("moe_k", f"= {cfg.moe_k} must be <= num_experts ({cfg.num_experts})")
    if cfg.d_model % cfg.n_heads:
        raise err("n_heads", f"= {cfg.n_heads} must divide d_model ({cfg.d_model})")
    for key in ("backbone_depths", "backbone_widths"):
        if len(getattr(cfg, key)) != 4:
            raise err(key, f"= {list(getattr(cfg, key))} must have 4 entries (one per ResNet stage)")
    return name, over


@dataclass
class RunConfig:
    model: DINOConfig
    data: DataConfig
    train: TrainConfig
    model_preset: str = "tiny"
    model_overrides: dict = dataclasses.field(default_factory=dict)

    def to_dict(self):
        """The JSON form (what a checkpoint stores, so ``damex eval`` can rebuild the model)."""
        model = {k: list(v) if isinstance(v, tuple) else v for k, v in self.model_overrides.items()}
        return {"model": {"preset": self.model_preset, **model},
                "data": dataclasses.asdict(self.data), "train": dataclasses.asdict(self.train)}

    def hash(self):
        """A short hash of the model and data sections (what a result depends on)."""
        d = self.to_dict()
        text = json.dumps({"model": d["model"], "data": d["data"]}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_config_from_dict(data, source="<dict>", data_cfg=None):
    """Build and check a :class:`RunConfig`; ``data_cfg`` replaces the data section when given."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be an object")
    for key in data:
        if key not in TOP_LEVEL:
            raise ConfigError(f"{source}: unknown key {key!r}; known keys: {list(TOP_LEVEL) + ['base']}")
    name, over = check_model(data.get("model", {}), source)
    if data_cfg is None:
        data_cfg = data_config_from_dict(data.get("data", {}), source, where="data")
    model_cfg = DINOConfig(**{**PRESETS[name].__dict__, **over})
    return RunConfig(model=model_cfg, data=data_cfg,
                     train=build_section(TrainConfig, data.get("train", {}), "train", source),
                     model_preset=name, model_overrides=over)


def _merge(base, over):
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_run_dict(path, _seen=()):
    """The raw dict of a config file with its ``base`` chain merged in and its data paths
    made absolute (each against the folder of the file that sets it)."""
    path = os.path.abspath(os.fspath(path))
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to this file")
    data = read_json_config(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be an object")
    data = copy.deepcopy(data)
    folder = os.path.dirname(path)
    if isinstance(data.get("data"), dict):
        resolve_data_paths(data["data"], folder)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: key 'base' must be a file name (string), got {base!r}")
    parent = read_run_dict(os.path.join(folder, base), _seen + (path,))
    return _merge(parent, data)


def _parse_value(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_overrides(data, sets, source="--set"):
    """Apply ``["section.key=value", ...]`` to a raw config dict (a new dict is returned).

    Values are parsed as JSON (``1e-4``, ``[0, 2]``, ``true``), else kept as strings.
    The key must exist in the schema; path values given here resolve against the
    working directory.
    """
    data = copy.deepcopy(data)
    for item in sets or ():
        if "=" not in item:
            raise ConfigError(f"{source} {item!r}: expected KEY=VALUE (e.g. train.lr=1e-4)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        value = _parse_value(text)
        _check_key(parts, key, source)
        if parts[-1] in ("root", "train", "val", "img_dir", "val_img_dir", "out_dir") \
                and isinstance(value, str) and not os.path.isabs(value):
            value = os.path.abspath(value)
        node = data
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"{source} {key}: {p!r} is not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return data


def _check_key(parts, key, source):
    if parts[0] not in TOP_LEVEL or len(parts) < 2:
        raise ConfigError(f"{source} {key}: unknown key {key!r}; keys are section.name with "
                          f"section one of {list(TOP_LEVEL)}")
    if parts[0] == "model":
        known = ["preset"] + [f.name for f in dataclasses.fields(DINOConfig)]
        if len(parts) != 2 or parts[1] not in known:
            raise ConfigError(f"{source} {key}: unknown key {key!r}; known keys: "
                              f"{sorted('model.' + k for k in known)}")
        return
    cls = {"data": DataConfig, "train": TrainConfig}[parts[0]]
    for depth, p in enumerate(parts[1:], 1):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if p not in fields:
            prefix = ".".join(parts[:depth])
            raise ConfigError(f"{source} {key}: unknown key {key!r}; known keys: "
                              f"{sorted(prefix + '.' + k for k in fields)}")
        if depth < len(parts) - 1:
            hint = typing.get_type_hints(cls)[p]
            if not dataclasses.is_dataclass(hint):
                raise ConfigError(f"{source} {key}: {'.'.join(parts[:depth + 1])!r} is not a section")
            cls = hint


def default_threads(model_cfg):
    """The measured good thread count for a model on this machine: 1 up to d_model 128
    (kernels too small to split: on the 2-core machine a training step of the tiny
    preset, and of tiny widened to d_model 128, was faster at 1 thread), all cores for
    larger models (d_model 256: 1.18x faster at 2 threads, the ResNet-50 presets
    1.4-1.5x); bench/bench_threads.py measures it."""
    if model_cfg.d_model <= 128:
        return 1
    return os.cpu_count() or 1


def finalize(cfg):
    """Resolve what a new run fixes once: ``out_dir`` absolute (against the working
    directory) and ``threads`` (the default for the model when absent or 0)."""
    cfg.train.out_dir = os.path.abspath(cfg.train.out_dir)
    if not cfg.train.threads:
        cfg.train.threads = default_threads(cfg.model)
    return cfg


def load_run_config(path, sets=None):
    """Read and check a run configuration file (with its ``base`` chain and ``sets``
    overrides from :func:`apply_overrides`)."""
    path = os.fspath(path)
    data = apply_overrides(read_run_dict(path), sets)
    data.setdefault("data", {})
    if isinstance(data["data"], dict):
        syn = data["data"].setdefault("synthetic", {})
        if isinstance(syn, dict) and "root" not in syn:
            syn["root"] = os.path.join(os.path.dirname(os.path.abspath(path)), "data/synthetic")
    return run_config_from_dict(data, source=path)
