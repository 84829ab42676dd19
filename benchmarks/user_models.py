"""Models written the way users write them, not through lrjax: what ``decompose_linen`` /
``decompose_nnx`` are tested and benchmarked on.

* :class:`ResNet` / :func:`resnet18` / :func:`resnet50`: the Flax ImageNet example's style: a
  ``conv: ModuleDef = nn.Conv`` field, convs called positionally without names
  (``self.conv(filters, (3, 3), strides)``), BatchNorm, 1x1 projection shortcuts; ResNet-50's
  bottleneck blocks are 1x1 -> 3x3 -> 1x1 (36 of its 53 convs are 1x1).
* :class:`DigitsCNN`: a small linen CNN for scikit-learn's 8x8 digits.
* :class:`Mixer`: an MLP-Mixer (patch embedding conv, token- and channel-mixing ``nn.Dense``
  MLPs, LayerNorm), written like the Flax/big_vision Mixers; every layer but the stem is dense.
* :class:`NNXCNN`: an NNX CNN with convs in an ``nnx.Sequential`` and an ``nnx.List``.
* :class:`UNet`: a U-Net as segmentation code writes it (Ronneberger et al.): two 3x3 conv /
  BatchNorm / ReLU per level, max pooling down, ``nn.ConvTranspose`` 2x2 stride-2 upsamplers,
  skip connections concatenated, a 1x1 head.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

ModuleDef = Any


class BasicBlock(nn.Module):
    """Two 3x3 convs and a shortcut (a strided 1x1 projection when the shape changes)."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        shortcut = x
        y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(x)))
        y = self.norm(scale_init=nn.initializers.zeros_init())(self.conv(self.filters, (3, 3))(y))
        if shortcut.shape != y.shape:
            shortcut = self.norm()(self.conv(self.filters, (1, 1), self.strides)(shortcut))
        return nn.relu(shortcut + y)


class BottleneckBlock(nn.Module):
    """1x1 (reduce), 3x3 (strided), 1x1 (expand x4) and a shortcut (a 1x1 projection when the
    shape changes)."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        shortcut = x
        y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
        y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
        y = self.norm(scale_init=nn.initializers.zeros_init())(
            self.conv(self.filters * 4, (1, 1))(y))
        if shortcut.shape != y.shape:
            shortcut = self.norm()(self.conv(self.filters * 4, (1, 1), self.strides)(shortcut))
        return nn.relu(shortcut + y)


class ResNet(nn.Module):
    """A ResNet in the Flax ImageNet example's style (stem, four stages, global pool, dense)."""

    stage_sizes: Sequence[int]
    block_cls: ModuleDef = BasicBlock
    num_classes: int = 1000
    num_filters: int = 64
    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                                 epsilon=1e-5, dtype=self.dtype)
        x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)])(x)
        x = nn.relu(norm()(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for stage, blocks in enumerate(self.stage_sizes):
            for block in range(blocks):
                strides = (2, 2) if stage > 0 and block == 0 else (1, 1)
                x = self.block_cls(self.num_filters * 2 ** stage, conv=conv, norm=norm,
                                   strides=strides)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def resnet18(**kwargs) -> ResNet:
    """ResNet-18: four stages of two basic blocks."""
    return ResNet(stage_sizes=(2, 2, 2, 2), **kwargs)


def resnet50(**kwargs) -> ResNet:
    """ResNet-50: stages of 3, 4, 6 and 3 bottleneck blocks."""
    return ResNet(stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock, **kwargs)


class MlpBlock(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(self.mlp_dim)(x)
        y = nn.gelu(y)
        return nn.Dense(x.shape[-1])(y)


class MixerBlock(nn.Module):
    tokens_mlp_dim: int
    channels_mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        y = jnp.swapaxes(y, 1, 2)
        y = MlpBlock(self.tokens_mlp_dim, name="token_mixing")(y)
        y = jnp.swapaxes(y, 1, 2)
        x = x + y
        y = nn.LayerNorm()(x)
        return x + MlpBlock(self.channels_mlp_dim, name="channel_mixing")(y)


class Mixer(nn.Module):
    """An MLP-Mixer for small images: ``patch x patch`` stem conv, mixer blocks, a dense head."""

    num_classes: int = 10
    patch: int = 4
    hidden_dim: int = 64
    num_blocks: int = 2
    tokens_mlp_dim: int = 64
    channels_mlp_dim: int = 128

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = nn.Conv(self.hidden_dim, (self.patch, self.patch), strides=self.patch,
                    name="stem")(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        for _ in range(self.num_blocks):
            x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim)(x)
        x = nn.LayerNorm(name="pre_head_layer_norm")(x)
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=1))


def small_bottleneck_resnet(**kwargs) -> ResNet:
    """A three-stage bottleneck ResNet (one block per stage, 16 base filters) for 32x32 inputs."""
    return ResNet(stage_sizes=(1, 1, 1), block_cls=BottleneckBlock, num_filters=16, **kwargs)


class DigitsCNN(nn.Module):
    """A small CNN for 32x32 (upsampled) digits: four 3x3 convs, two poolings, a dense head."""

    num_classes: int = 10
    widths: Sequence[int] = (32, 64, 64, 128)

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, width in enumerate(self.widths):
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            if i % 2 == 1:
                x = nn.max_pool(x, (2, 2), (2, 2))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


class NNXCNN(nnx.Module):
    """An NNX CNN: a stem conv, an ``nnx.Sequential`` and an ``nnx.List`` of convs, a 1x1 head."""

    def __init__(self, channels: int = 3, width: int = 16, num_classes: int = 10, *,
                 rngs: nnx.Rngs, act: Callable = nnx.relu):
        self.stem = nnx.Conv(channels, width, (3, 3), rngs=rngs)
        self.body = nnx.Sequential(nnx.Conv(width, width, (3, 3), rngs=rngs), act,
                                   nnx.Conv(width, 2 * width, (3, 3), strides=2, rngs=rngs), act)
        self.blocks = nnx.List([nnx.Conv(2 * width, 2 * width, (3, 3), rngs=rngs)
                                for _ in range(2)])
        self.head = nnx.Conv(2 * width, num_classes, (1, 1), rngs=rngs)
        self.act = act

    def __call__(self, x):
        x = self.body(self.act(self.stem(x)))
        for conv in self.blocks:
            x = x + self.act(conv(x))
        return jnp.mean(self.head(x), axis=(1, 2))


class DoubleConv(nn.Module):
    """Two 3x3 conv -> BatchNorm -> ReLU."""

    features: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        for _ in range(2):
            x = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.relu(x)
        return x


class UNet(nn.Module):
    """A U-Net: ``len(widths) - 1`` poolings, a transposed-conv upsampler per level."""

    num_classes: int = 2
    widths: Sequence[int] = (32, 64, 128, 256, 512)

    @nn.compact
    def __call__(self, x, train: bool = False):
        skips = []
        for width in self.widths[:-1]:
            x = DoubleConv(width)(x, train)
            skips.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = DoubleConv(self.widths[-1])(x, train)
        for width, skip in zip(reversed(self.widths[:-1]), reversed(skips), strict=True):
            x = nn.ConvTranspose(width, (2, 2), strides=(2, 2))(x)
            x = DoubleConv(width)(jnp.concatenate([skip, x], axis=-1), train)
        return nn.Conv(self.num_classes, (1, 1))(x)
