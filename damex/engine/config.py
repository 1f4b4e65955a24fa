"""A run's configuration: ``{"model": {...}, "data": {...}, "train": {...}}`` in JSON.

``model`` holds ``preset`` ("tiny" or "paper") and any :class:`~damex.models.dino.DINOConfig`
field to override; ``data`` is :class:`~damex.data.config.DataConfig`; ``train`` is
:class:`TrainConfig`.  Unknown keys are errors naming the key and the file.
"""
import dataclasses
import os
from dataclasses import dataclass, field
from typing import List

from ..data.config import (ConfigError, DataConfig, _build, data_config_from_dict, load_data_config,
                           read_json_config)
from ..models.dino import DINOConfig, preset
from ..routing import DAMEX_WEIGHT

TOP_LEVEL = ("model", "data", "train")


@dataclass
class TrainConfig:
    steps: int = 2000
    lr: float = 4e-4
    lr_backbone: float = 4e-4
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    lr_drop: List[int] = field(default_factory=list)   # steps at which lr *= lr_gamma
    lr_gamma: float = 0.1
    routing_weight: float = DAMEX_WEIGHT
    log_every: int = 20
    checkpoint_every: int = 500
    out_dir: str = "runs/tiny"
    seed: int = 0
    threads: int = 0                                      # 0 = all cores
    nonfinite: str = "stop"          # NaN/inf loss or gradients: "stop", or "skip" the batch
    nonfinite_max_skips: int = 10    # with "skip": stop at the next bad batch after this many


@dataclass
class RunConfig:
    model: DINOConfig
    data: DataConfig
    train: TrainConfig
    model_preset: str = "tiny"
    model_overrides: dict = field(default_factory=dict)

    def to_dict(self):
        """The JSON form (what a checkpoint stores, so ``damex eval`` can rebuild the model)."""
        return {"model": {"preset": self.model_preset, **self.model_overrides},
                "data": dataclasses.asdict(self.data), "train": dataclasses.asdict(self.train)}


def run_config_from_dict(data, source="<dict>", data_cfg=None):
    """Build a :class:`RunConfig`; ``data_cfg`` replaces the data section when given."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be an object")
    for key in data:
        if key not in TOP_LEVEL:
            raise ConfigError(f"{source}: unknown key {key!r}; known keys: {list(TOP_LEVEL)}")
    model = dict(data.get("model", {}))
    name = model.pop("preset", "tiny")
    model = {k: tuple(v) if isinstance(v, list) else v for k, v in model.items()}
    try:
        model_cfg = preset(name, **model)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: model: {e}") from None
    if data_cfg is None:
        data_cfg = data_config_from_dict(data.get("data", {}), source)
    train = _build(TrainConfig, data.get("train", {}), "train", source)
    if train.nonfinite not in ("stop", "skip") or train.nonfinite_max_skips < 0:
        raise ConfigError(f"{source}: key 'train.nonfinite' must be 'stop' or 'skip' and "
                          f"'train.nonfinite_max_skips' >= 0, got {train.nonfinite!r}, "
                          f"{train.nonfinite_max_skips!r}")
    return RunConfig(model=model_cfg, data=data_cfg, train=train,
                     model_preset=name, model_overrides=model)


def load_run_config(path):
    """Read and check a run configuration file.  Data paths resolve against the
    file's folder (as in :func:`~damex.data.config.load_data_config`); ``out_dir``
    against the working directory."""
    path = os.fspath(path)
    data = read_json_config(path)
    data_cfg = load_data_config(path) if isinstance(data, dict) and "data" in data else None
    return run_config_from_dict(data, source=path, data_cfg=data_cfg)
