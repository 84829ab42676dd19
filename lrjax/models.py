"""Model zoo: NIN, the authors' CIFAR CNN, VGG-16 and CaffeNet, each with full and low-rank variants.

Each family is one plain linen definition (``nn.Conv`` layers with names, an optional norm factory
``norm``); its low-rank variant is the same definition wrapped by :class:`lrjax.layers.LowRankModel`
with the authors' ranks (``get_model(family, lowrank=True)``), the machinery that compresses any
user model. Convolutions and max pooling go through :mod:`lrjax.formulations` (plain XLA ops
under the ``"portable"`` policy). Every model is called as ``model.apply(variables, images,
train=...)`` on NHWC images and returns logits. ``dtype`` is the compute dtype (``jnp.bfloat16`` on
accelerators); parameters stay float32. Conv and dense kernels follow Flax's HWIO / (in, out)
layouts; layer names follow the papers (``conv1_1`` ... ``fc8`` for VGG-16, ``conv1`` ...
``cccp6`` for NIN).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lrjax import formulations
from lrjax.layers import LowRankModel
from lrjax.ranks import load_ranks

__all__ = [
    "NIN", "CifarCNN", "VGG16", "CaffeNet", "AlexNet", "ModelSpec", "MODELS", "get_model",
    "model_spec", "init_variables",
    "batch_norm", "local_response_norm", "adaptive_avg_pool", "max_pool", "Conv",
]

ModuleDef = Callable[..., nn.Module]

# The zoo's conv: ``nn.Conv`` computing what lrjax.formulations' policy picks (plain XLA
# convolutions under "portable"). Its type is nn.Conv, so surgery decomposes it like any user conv.
Conv = functools.partial(nn.Conv, conv_general_dilated=formulations.conv_general_dilated)
max_pool = formulations.max_pool


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
    window = sum(jax.lax.slice_in_dim(padded, i, i + x.shape[-1], axis=-1) for i in range(size))
    return (x / jnp.power(k + alpha / size * window, beta)).astype(x.dtype)


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
    norm: ModuleDef | None = None
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(Conv, dtype=self.dtype)
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
    norm: ModuleDef | None = None
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(Conv, dtype=self.dtype)
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
    norm: ModuleDef | None = None
    widths: tuple[tuple[int, ...], ...] = VGG16_WIDTHS
    fc_features: int = 4096
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(Conv, dtype=self.dtype)
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
    norm: ModuleDef | None = None
    widths: tuple[int, ...] = (96, 256, 384, 384, 256)
    fc_features: int = 4096
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(Conv, dtype=self.dtype)
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
    norm: ModuleDef | None = None
    widths: tuple[int, ...] = (64, 192, 384, 256, 256)
    fc_features: int = 4096
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(Conv, dtype=self.dtype)
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
    """A registry entry: a model family, what it eats, and its low-rank variant's shipped ranks."""

    family: type[nn.Module]
    image_size: int
    num_classes: int
    ranks: str | None = None  # shipped rank config (lrjax/rank_configs) of the low-rank variant
    description: str = ""


MODELS: dict[str, ModelSpec] = {
    "nin": ModelSpec(NIN, 32, 10, "nin", "NIN (nin_cudnn.lua); low-rank: conv1 rank 10, conv2 51"),
    "cnn": ModelSpec(CifarCNN, 32, 10, "cnn", "the authors' CIFAR baseline CNN"),
    "vgg16": ModelSpec(VGG16, 224, 1000, "vgg16", "VGG-16, torchvision layout"),
    "caffenet": ModelSpec(CaffeNet, 227, 1000, "caffenet", "CaffeNet (grouped conv2/4/5)"),
    "alexnet": ModelSpec(AlexNet, 224, 1000, None, "AlexNet, torchvision layout (no shipped ranks)"),
}


def model_spec(family: str) -> ModelSpec:
    """The registry entry of a model family; ``ValueError`` naming the known ones otherwise."""
    if family not in MODELS:
        raise ValueError(f"unknown model {family!r}; choose from: {', '.join(MODELS)}")
    return MODELS[family]


def get_model(family: str, *, lowrank: bool = False, bn: bool = False,
              ranks: Mapping[str, int | None] | None = None, bn_momentum: float = 0.9,
              **overrides) -> nn.Module:
    """Build a zoo model.

    Args:
      family: a key of :data:`MODELS` (``"nin"``, ``"cnn"``, ``"vgg16"``, ``"caffenet"``,
        ``"alexnet"``).
      lowrank: the low-rank variant: the same definition wrapped by
        :class:`lrjax.layers.LowRankModel`, with ``ranks`` or else the authors' ranks.
      bn: batch norm after the convs (each family's documented placement).
      ranks: ``{layer path: rank}`` of the low-rank variant (``None`` keeps a layer full rank);
        giving ranks implies ``lowrank=True``.
      bn_momentum: Flax BatchNorm momentum (0.9 = Torch/Caffe's 0.1 update).
      **overrides: module fields (``num_classes``, ``dtype``, ``widths``, ...).
    """
    spec = model_spec(family)
    fields = {"num_classes": spec.num_classes}
    if bn:
        fields["norm"] = batch_norm(bn_momentum)
    fields.update(overrides)
    model = spec.family(**fields)
    if not lowrank and ranks is None:
        return model
    if ranks is None:
        if spec.ranks is None:
            raise ValueError(f"model {family!r} has no shipped ranks: pass ranks={{layer: rank}}")
        ranks = load_ranks(spec.ranks)
    return LowRankModel.wrap(model, ranks)


def init_variables(model: nn.Module, image_size: int, seed: int = 0, channels: int = 3):
    """Variables of ``model`` for a ``(1, image_size, image_size, channels)`` input."""
    x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
    return jax.jit(functools.partial(model.init, train=False))(jax.random.key(seed), x)
