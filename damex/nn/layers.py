"""Basic layers with PyTorch's parameter names, shapes and initialisation."""
import math

import numpy as np

from .. import functional as F
from . import init
from .module import Module, ModuleList, Parameter

__all__ = ["Linear", "LayerNorm", "GroupNorm", "Conv2d", "MaxPool2d", "FrozenBatchNorm2d",
           "Dropout", "Embedding", "ReLU", "GELU", "Identity", "MLP"]


def _empty(*shape):
    return np.zeros(shape, np.float32)


class Linear(Module):
    """``y = x @ weight.T + bias``; weight[out, in], bias[out] (nn.Linear init)."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = Parameter(_empty(out_features, in_features))
        if bias:
            self.bias = Parameter(_empty(out_features))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self, rng=None):
        init.kaiming_uniform_(self.weight, a=math.sqrt(5), rng=rng)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features else 0
            init.uniform_(self.bias, -bound, bound, rng)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _norm_affine(module, shape, affine):
    """A norm's weight (ones) and bias (zeros) of `shape`, or None for both."""
    if affine:
        module.weight = Parameter(np.ones(shape, np.float32))
        module.bias = Parameter(np.zeros(shape, np.float32))
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


class LayerNorm(Module):
    """Layer norm over the last axis; weight (ones) and bias (zeros) of shape [C]."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        ns = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else tuple(normalized_shape)
        if len(ns) != 1:
            raise ValueError(f"LayerNorm: only the last axis is supported, got normalized_shape={ns}")
        self.normalized_shape, self.eps = (int(ns[0]),), float(eps)
        _norm_affine(self, ns, elementwise_affine)

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}"


class GroupNorm(Module):
    """Group norm of x[N, C, H, W]; weight (ones) and bias (zeros) of shape [C]."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_channels={num_channels} is not divisible by num_groups={num_groups}")
        self.num_groups, self.num_channels, self.eps = int(num_groups), int(num_channels), float(eps)
        _norm_affine(self, (num_channels,), affine)

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


class Conv2d(Module):
    """2-D convolution, weight[out, in, kh, kw], bias[out] (nn.Conv2d init)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, (int, np.integer)) else kernel_size
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = (int(kh), int(kw)), stride, padding
        self.weight = Parameter(_empty(out_channels, in_channels, kh, kw))
        if bias:
            self.bias = Parameter(_empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self, rng=None):
        init.kaiming_uniform_(self.weight, a=math.sqrt(5), rng=rng)
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            init.uniform_(self.bias, -bound, bound, rng)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")


class MaxPool2d(Module):
    """2-D max pooling (``stride`` defaults to ``kernel_size``, as torch.nn.MaxPool2d)."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class FrozenBatchNorm2d(Module):
    """Batch norm with fixed statistics and affine (DETR): buffers weight, bias,
    running_mean, running_var; nothing is trained."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.num_features, self.eps = int(num_features), float(eps)
        self.register_buffer("weight", np.ones(num_features, np.float32))
        self.register_buffer("bias", np.zeros(num_features, np.float32))
        self.register_buffer("running_mean", np.zeros(num_features, np.float32))
        self.register_buffer("running_var", np.ones(num_features, np.float32))

    def forward(self, x):
        return F.frozen_batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"


class Dropout(Module):
    """Zeroes elements with probability ``p`` in training mode; identity in eval.

    The mask is drawn from the forward context's stream of this module when one is
    given (``forward(x, ctx)``; see :class:`~damex.nn.context.ForwardContext`), else from
    the module's own Generator (``seed``), so runs replay bit for bit."""

    def __init__(self, p=0.5, seed=None):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = float(p)
        self._rng = np.random.default_rng(seed if seed is not None else init.default_generator().integers(2**63 - 1))

    def forward(self, x, ctx=None):
        return F.dropout(x, self.p, self.training, seed=self._rng if ctx is None else ctx.rng(self))

    def extra_repr(self):
        return f"p={self.p}"


class Embedding(Module):
    """A lookup table weight[num_embeddings, embedding_dim] (N(0, 1) init)."""

    def __init__(self, num_embeddings, embedding_dim):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.weight = Parameter(_empty(num_embeddings, embedding_dim))
        init.normal_(self.weight)

    def forward(self, ids):
        return F.embedding(ids, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)


class GELU(Module):
    def __init__(self, approximate="none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x, self.approximate)


class Identity(Module):
    def forward(self, x):
        return x


class MLP(Module):
    """DETR's MLP: ``num_layers`` Linear layers with ReLU between (names ``layers.i.weight``)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.num_layers = num_layers
        self.layers = ModuleList(Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x

