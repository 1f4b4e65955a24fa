"""Modules in the style of ``torch.nn``, built on the damex tape.

>>> import damex.nn as nn
>>> layer = nn.Linear(16, 8)
>>> nn.save(layer, "layer.npz"); layer.load_state_dict(nn.load("layer.npz"))
"""
from . import init, utils  # noqa: F401
from .attention import MSDeformAttn, MultiheadAttention
from .init import manual_seed
from .layers import (GELU, MLP, Conv2d, Dropout, Embedding, FrozenBatchNorm2d, GroupNorm, Identity,
                     LayerNorm, Linear, MaxPool2d, ReLU)
from .module import Module, ModuleList, Parameter, Sequential
from .moe import MoE
from .serialization import load, save
from .. import functional  # noqa: F401  (damex.nn.functional, like torch.nn.functional)

__all__ = ["Module", "Parameter", "Sequential", "ModuleList", "Linear", "LayerNorm", "GroupNorm",
           "Conv2d", "MaxPool2d", "FrozenBatchNorm2d", "Dropout", "Embedding", "ReLU", "GELU",
           "Identity", "MLP",
           "MultiheadAttention", "MSDeformAttn", "MoE", "save", "load", "init", "utils",
           "manual_seed", "functional"]
