"""Model zoo: NIN, the authors' CIFAR CNN, VGG-16 and CaffeNet, each with full and low-rank variants.

Each family is one definition taking a conv factory (``conv``) and an optional norm factory
(``norm``); the low-rank model is the same definition with :func:`lrjax.layers.low_rank`'s factory.
Every model is called as ``model.apply(variables, images, train=...)`` on NHWC images and returns
logits. ``dtype`` is the compute dtype (``jnp.bfloat16`` on accelerators); parameters stay float32.
Conv and dense kernels follow Flax's HWIO / (in, out) layouts; layer names follow the papers
(``conv1_1`` ... ``fc8`` for VGG-16, ``conv1`` ... ``cccp6`` for NIN).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lrjax.layers import ConvFactory, full_rank, low_rank
from lrjax.ranks import load_ranks

__all__ = [
    "NIN", "CifarCNN", "VGG16", "CaffeNet", "AlexNet", "ModelSpec", "MODELS", "get_model", "model_spec",
    "batch_norm", "local_response_norm", "adaptive_avg_pool", "max_pool",
]

ModuleDef = Callable[..., nn.Module]


def batch_norm(momentum: float = 0.9, epsilon: float = 1e-5) -> ModuleDef:
    """A BatchNorm factory with Torch/Caffe's running-statistics weight 0.1 (Flax momentum 0.9)."""
    return functools.partial(nn.BatchNorm, momentum=momentum, epsilon=epsilon)


def _norm_or_identity(norm: ModuleDef | None, train: bool, dtype, name: str):
    if norm is None:
        return lambda y: y
    return norm(use_running_average=not train, dtype=dtype, name=name)


def local_response_norm(x, size=5, alpha=1e-4, beta=0.75, k=1.0):
    """Caffe's across-channel LRN: ``x / (k + alpha / size * sum_window x^2) ** beta``."""
    sq = jnp.square(x.astype(jnp.float32))
    half = size // 2
    padded = jnp.pad(sq, [(0, 0)] * (x.ndim - 1) + [(half, size - 1 - half)])
    window = sum(padded[..., i:i + x.shape[-1]] for i in range(size))
    return (x / jnp.power(k + alpha / size * window, beta)).astype(x.dtype)


def max_pool(x, window_shape, strides=None, padding="VALID"):
    """Max pooling over the spatial axes of ``(..., *spatial, C)``; the same values as ``nn.max_pool``.

    Evaluated alone it is ``nn.max_pool`` (XLA's reduce-window). Differentiated (a ``custom_jvp``,
    so forward and reverse mode both work) it is computed as running maxima of strided slices, one
    spatial axis at a time (a 3x3 window takes 2 + 2 elementwise maxima), whose gradient is made of
    elementwise selects: XLA then needs no ``select_and_scatter``, which XLA:CPU expands into an
    index-tracking reduce-window plus a scatter (about a fifth of the NIN train step at batch 128
    on 2 CPU cores; see BENCHMARKS.md). Inference keeps the reduce-window, which XLA:CPU fuses
    better (the low-rank VGG-16 forward pass is ~1.5x slower with the slices). Where inputs of a
    window tie for the maximum, the gradient is shared among them (``nn.max_pool`` gives it all to
    the first); both are subgradients.

    Args:
      x: ``(..., *spatial, C)`` with ``len(window_shape)`` spatial axes.
      window_shape: window size per spatial axis.
      strides: stride per spatial axis (default 1).
      padding: ``"VALID"``, ``"SAME"`` or ``((lo, hi), ...)`` per spatial axis; padded cells are
        ``-inf`` so they never win.
    """
    window_shape = tuple(window_shape)
    n = len(window_shape)
    strides = (1,) * n if strides is None else tuple(strides)
    if len(strides) != n or x.ndim < n + 1:
        raise ValueError(f"max_pool: window {window_shape} and strides {strides} need as many "
                         f"spatial axes, before a channel axis; got input shape {x.shape}")
    spatial = x.shape[x.ndim - 1 - n:-1]
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(spatial, window_shape, strides, padding)
    padding = tuple(tuple(int(v) for v in p) for p in padding)
    if len(padding) != n:
        raise ValueError(f"max_pool: padding {padding} must give (lo, hi) for {n} spatial axes")
    for k, s, size, (lo, hi) in zip(window_shape, strides, spatial, padding, strict=True):
        if not 1 <= k <= size + lo + hi or s < 1:
            raise ValueError(f"max_pool: window {window_shape} / strides {strides} do not fit "
                             f"input shape {x.shape} with padding {padding}")

    def slice_maxima(x):
        if any(any(p) for p in padding):
            low = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
            x = jnp.pad(x, [(0, 0)] * (x.ndim - 1 - n) + list(padding) + [(0, 0)],
                        constant_values=low)
        for i, (k, s) in enumerate(zip(window_shape, strides, strict=True)):
            axis = x.ndim - 1 - n + i
            count = (x.shape[axis] - k) // s + 1
            taps = [jax.lax.slice_in_dim(x, j, j + (count - 1) * s + 1, s, axis=axis)
                    for j in range(k)]
            x = functools.reduce(jnp.maximum, taps)
        return x

    @jax.custom_jvp
    def pool(x):
        return nn.max_pool(x, window_shape, strides, padding)

    @pool.defjvp
    def pool_jvp(primals, tangents):  # forward and reverse mode both go through the slices
        return jax.jvp(slice_maxima, primals, tangents)

    return pool(x)


def adaptive_avg_pool(x, output_hw):
    """PyTorch's ``AdaptiveAvgPool2d`` on NHWC: bin ``i`` spans ``[floor(iH/h), ceil((i+1)H/h))``."""
    h_in, w_in = x.shape[-3], x.shape[-2]
    h_out, w_out = output_hw
    if (h_in, w_in) == (h_out, w_out):
        return x

    def bins(n_in, n_out):
        return [(i * n_in // n_out, -(-(i + 1) * n_in // n_out)) for i in range(n_out)]

    rows = [jnp.mean(x[..., a:b, :, :], axis=-3, keepdims=True) for a, b in bins(h_in, h_out)]
    x = jnp.concatenate(rows, axis=-3)
    cols = [jnp.mean(x[..., a:b, :], axis=-2, keepdims=True) for a, b in bins(w_in, w_out)]
    return jnp.concatenate(cols, axis=-2)


class NIN(nn.Module):
    """Network in Network for CIFAR-10 as in the authors' Torch code (``nin_cudnn.lua``).

    With ``norm`` set, batch norm follows conv1, cccp2, conv3 and cccp5 (``lowrank_nin_2``'s
    placement). The low-rank NIN decomposes conv1 (rank 10) and conv2 (rank 51).
    """

    num_classes: int = 10
    conv: ConvFactory = full_rank()
    norm: ModuleDef | None = None
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(self.conv, dtype=self.dtype)
        norm = functools.partial(_norm_or_identity, self.norm, train, self.dtype)
        x = x.astype(self.dtype)
        pad = ((1, 0), (1, 0))  # Torch's SpatialZeroPadding(1, 0, 1, 0) before 3x3/2 pooling

        x = nn.relu(norm("bn1")(conv(192, (5, 5), padding=2, name="conv1")(x)))
        x = nn.relu(conv(160, (1, 1), name="cccp1")(x))
        x = nn.relu(norm("bn2")(conv(96, (1, 1), name="cccp2")(x)))
        x = max_pool(jnp.pad(x, ((0, 0), *pad, (0, 0))), (3, 3), (2, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)

        x = nn.relu(conv(192, (5, 5), padding=2, name="conv2")(x))
        x = nn.relu(conv(192, (1, 1), name="cccp3")(x))
        x = nn.relu(conv(192, (1, 1), name="cccp4")(x))
        x = nn.avg_pool(jnp.pad(x, ((0, 0), *pad, (0, 0))), (3, 3), (2, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)

        x = nn.relu(norm("bn3")(conv(192, (3, 3), padding=1, name="conv3")(x)))
        x = nn.relu(norm("bn4")(conv(192, (1, 1), name="cccp5")(x)))
        x = conv(self.num_classes, (1, 1), name="cccp6")(x)
        return jnp.mean(x, axis=(-3, -2)).astype(jnp.float32)


class CifarCNN(nn.Module):
    """The authors' smaller CIFAR-10 baseline (``baseline_cudnn.lua``): three 5x5 convs, a 1x1 conv,
    two dense layers. The low-rank version decomposes conv1 (10), conv2 (51) and conv3 (51)."""

    num_classes: int = 10
    conv: ConvFactory = full_rank()
    norm: ModuleDef | None = None
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(self.conv, dtype=self.dtype)
        norm = functools.partial(_norm_or_identity, self.norm, train, self.dtype)
        x = x.astype(self.dtype)
        for i, width in enumerate((96, 128, 256), start=1):
            x = nn.relu(norm(f"bn{i}")(conv(width, (5, 5), padding=2, name=f"conv{i}")(x)))
            x = max_pool(x, (2, 2), (2, 2))
        x = nn.relu(conv(64, (1, 1), name="conv4")(x))
        x = x.reshape(x.shape[:-3] + (-1,))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.relu(nn.Dense(256, dtype=self.dtype, name="fc1")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc2")(x).astype(jnp.float32)


VGG16_WIDTHS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG16(nn.Module):
    """VGG-16 (config D) with torchvision's classifier: adaptive 7x7 average pool, fc6, fc7, fc8.

    Parameters match torchvision's ``vgg16`` one to one (138,357,544 at 1000 classes); kernels are
    HWIO and fc6's input is flattened in NHWC order (see ``lrjax.pretrained`` for the import).
    ``widths`` and ``fc_features`` shrink the net for tests. With ``norm``, BN follows every conv.
    """

    num_classes: int = 1000
    conv: ConvFactory = full_rank()
    norm: ModuleDef | None = None
    widths: tuple[tuple[int, ...], ...] = VGG16_WIDTHS
    fc_features: int = 4096
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(self.conv, dtype=self.dtype)
        norm = functools.partial(_norm_or_identity, self.norm, train, self.dtype)
        x = x.astype(self.dtype)
        for b, block in enumerate(self.widths, start=1):
            for i, width in enumerate(block, start=1):
                name = f"conv{b}_{i}"
                x = nn.relu(norm(f"bn{b}_{i}")(conv(width, (3, 3), padding=1, name=name)(x)))
            x = max_pool(x, (2, 2), (2, 2))
        x = adaptive_avg_pool(x, (7, 7))
        x = x.reshape(x.shape[:-3] + (-1,))
        for name in ("fc6", "fc7"):
            x = nn.relu(nn.Dense(self.fc_features, dtype=self.dtype, name=name)(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc8")(x).astype(jnp.float32)


class CaffeNet(nn.Module):
    """CaffeNet (BVLC reference: AlexNet with pooling before LRN; grouped conv2, conv4, conv5).

    Input 227x227. Without ``norm`` it uses LRN after pool1 and pool2; with ``norm`` (the authors'
    BN recipe) BN follows every conv (after the horizontal conv of a pair) and fc6/fc7, and LRN is
    dropped.
    """

    num_classes: int = 1000
    conv: ConvFactory = full_rank()
    norm: ModuleDef | None = None
    widths: tuple[int, ...] = (96, 256, 384, 384, 256)
    fc_features: int = 4096
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(self.conv, dtype=self.dtype)
        norm = functools.partial(_norm_or_identity, self.norm, train, self.dtype)
        lrn = local_response_norm if self.norm is None else (lambda y: y)
        w1, w2, w3, w4, w5 = self.widths
        x = x.astype(self.dtype)
        x = nn.relu(norm("bn1")(conv(w1, (11, 11), strides=4, padding="VALID", name="conv1")(x)))
        x = lrn(max_pool(x, (3, 3), (2, 2)))
        x = nn.relu(norm("bn2")(conv(w2, (5, 5), padding=2, feature_group_count=2,
                                     name="conv2")(x)))
        x = lrn(max_pool(x, (3, 3), (2, 2)))
        x = nn.relu(norm("bn3")(conv(w3, (3, 3), padding=1, name="conv3")(x)))
        x = nn.relu(norm("bn4")(conv(w4, (3, 3), padding=1, feature_group_count=2,
                                     name="conv4")(x)))
        x = nn.relu(norm("bn5")(conv(w5, (3, 3), padding=1, feature_group_count=2,
                                     name="conv5")(x)))
        x = max_pool(x, (3, 3), (2, 2))
        x = x.reshape(x.shape[:-3] + (-1,))
        for name in ("fc6", "fc7"):
            x = nn.Dense(self.fc_features, dtype=self.dtype, name=name)(x)
            x = nn.relu(norm(f"bn_{name}")(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc8")(x).astype(jnp.float32)


class AlexNet(nn.Module):
    """torchvision's AlexNet (single-tower, 64-192-384-256-256; adaptive 6x6 pool), so that public
    weights of a second ImageNet family can be imported and decomposed."""

    num_classes: int = 1000
    conv: ConvFactory = full_rank()
    norm: ModuleDef | None = None
    widths: tuple[int, ...] = (64, 192, 384, 256, 256)
    fc_features: int = 4096
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(self.conv, dtype=self.dtype)
        norm = functools.partial(_norm_or_identity, self.norm, train, self.dtype)
        w1, w2, w3, w4, w5 = self.widths
        x = x.astype(self.dtype)
        x = nn.relu(norm("bn1")(conv(w1, (11, 11), strides=4, padding=2, name="conv1")(x)))
        x = max_pool(x, (3, 3), (2, 2))
        x = nn.relu(norm("bn2")(conv(w2, (5, 5), padding=2, name="conv2")(x)))
        x = max_pool(x, (3, 3), (2, 2))
        x = nn.relu(norm("bn3")(conv(w3, (3, 3), padding=1, name="conv3")(x)))
        x = nn.relu(norm("bn4")(conv(w4, (3, 3), padding=1, name="conv4")(x)))
        x = nn.relu(norm("bn5")(conv(w5, (3, 3), padding=1, name="conv5")(x)))
        x = max_pool(x, (3, 3), (2, 2))
        x = adaptive_avg_pool(x, (6, 6))
        x = x.reshape(x.shape[:-3] + (-1,))
        for name in ("fc6", "fc7"):
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
            x = nn.relu(nn.Dense(self.fc_features, dtype=self.dtype, name=name)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc8")(x).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registry entry: how to build a model and what it eats."""

    family: type[nn.Module]
    image_size: int
    num_classes: int
    ranks: str | None = None  # shipped rank config of the low-rank variant
    bn: bool = False
    description: str = ""


MODELS: dict[str, ModelSpec] = {
    "nin": ModelSpec(NIN, 32, 10, description="NIN (nin_cudnn.lua)"),
    "lowrank_nin": ModelSpec(NIN, 32, 10, "nin", description="low-rank NIN (ranks 10, 51)"),
    "nin_bn": ModelSpec(NIN, 32, 10, bn=True, description="NIN with lowrank_nin_2's batch norm"),
    "lowrank_nin_bn": ModelSpec(NIN, 32, 10, "nin", bn=True,
                                description="low-rank NIN with batch norm (lowrank_nin_2)"),
    "cnn": ModelSpec(CifarCNN, 32, 10, description="the authors' CIFAR baseline CNN"),
    "lowrank_cnn": ModelSpec(CifarCNN, 32, 10, "cnn", description="low-rank baseline CNN"),
    "vgg16": ModelSpec(VGG16, 224, 1000, description="VGG-16, torchvision layout"),
    "lowrank_vgg16": ModelSpec(VGG16, 224, 1000, "vgg16", description="low-rank VGG-16"),
    "vgg16_bn": ModelSpec(VGG16, 224, 1000, bn=True, description="VGG-16 with BN after convs"),
    "lowrank_vgg16_bn": ModelSpec(VGG16, 224, 1000, "vgg16", bn=True,
                                  description="low-rank VGG-16 with BN (from scratch)"),
    "caffenet": ModelSpec(CaffeNet, 227, 1000, description="CaffeNet (grouped conv2/4/5)"),
    "lowrank_caffenet": ModelSpec(CaffeNet, 227, 1000, "caffenet",
                                  description="low-rank CaffeNet"),
    "caffenet_bn": ModelSpec(CaffeNet, 227, 1000, bn=True, description="CaffeNet with BN"),
    "alexnet": ModelSpec(AlexNet, 224, 1000, description="AlexNet, torchvision layout"),
    "lowrank_caffenet_bn": ModelSpec(CaffeNet, 227, 1000, "caffenet", bn=True,
                                     description="low-rank CaffeNet with BN (from scratch)"),
}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from: {', '.join(MODELS)}")
    return MODELS[name]


def get_model(name: str, *, ranks: dict[str, int | None] | None = None,
              bn_momentum: float = 0.9, **overrides) -> nn.Module:
    """Build a zoo model by name.

    Args:
      name: a key of :data:`MODELS` (``"nin"``, ``"lowrank_nin_bn"``, ``"vgg16"``, ...).
      ranks: per-layer ranks for a low-rank model (default: the authors'); giving ranks to a
        full-rank name builds its low-rank twin with those ranks.
      bn_momentum: Flax BatchNorm momentum of BN variants (0.9 = Torch/Caffe's 0.1 update).
      **overrides: module fields (``num_classes``, ``dtype``, ``widths``, ...).
    """
    spec = model_spec(name)
    if ranks is None and spec.ranks is not None:
        ranks = load_ranks(spec.ranks)
    fields = {"num_classes": spec.num_classes}
    if ranks is not None:
        fields["conv"] = low_rank(ranks)
    if spec.bn:
        fields["norm"] = batch_norm(bn_momentum)
    fields.update(overrides)
    return spec.family(**fields)


def init_variables(model: nn.Module, image_size: int, seed: int = 0, channels: int = 3):
    """Variables of ``model`` for a ``(1, image_size, image_size, channels)`` input."""
    x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
    return jax.jit(functools.partial(model.init, train=False))(jax.random.key(seed), x)
