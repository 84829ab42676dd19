"""The ONNX translator, one primitive at a time: every entry of ``onnx_convert.HANDLERS`` is
exercised by a function whose jaxpr holds it, exported and run in ONNX Runtime against JAX; and
what it cannot translate is one ``TranslationError`` line naming the primitive and the layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lrjax
from lrjax import export, onnx_convert, runtimes
from tests.helpers import init

pytest.importorskip("onnxruntime")

SHAPE = (2, 6, 6, 3)
_W = np.random.default_rng(0).standard_normal((3, 3, 3, 4)).astype(np.float32) * 0.5
_D = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)


def conv(x):
    """A conv, so that what follows sees a tensor stored NCHW by the translator."""
    return jax.lax.conv_general_dilated(x, _W, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def first(x):
    """The first channel, as a ``slice`` (``x[..., :1]`` lowers to a gather)."""
    return jax.lax.slice_in_dim(x, 0, 1, axis=3)


def pos(x):
    return jnp.abs(conv(x)) + 0.5


def tokens(x):
    """The conv's output as a sequence of 36 tokens of width 4."""
    return conv(x).reshape(x.shape[0], -1, 4)


def images(x):
    """The tokens as 4 channel images of 6×6, with a unit feature axis: ``(N, 4, 6, 6, 1)``."""
    return jnp.swapaxes(tokens(x), 1, 2).reshape(x.shape[0], 4, 6, 6)[..., None]


def _scattered(x):
    """Scatters other than one window at one start (``ScatterND``): points at constant indices
    (two outside, dropped), at indices of the data (a token unshuffle), clipped, and windows
    per example under ``jax.vmap`` (operand batching axes), at starts clamped."""
    h, n = conv(x), x.shape[0]
    points = h.at[:, :, np.array([4, 0, 9, 2, -7])].set(-h[:, :, :5] * 2)
    order = jnp.argsort(h[..., 0].reshape(n, 36), axis=1)
    unshuffled = jnp.zeros_like(tokens(x)).at[jnp.arange(n)[:, None], order].set(tokens(x))
    clipped = h.at[:, np.array([1, 8])].set(7.0, mode="clip")
    windows = jax.vmap(lambda row, i: jax.lax.dynamic_update_slice(
        row, jnp.ones((2, 2, 4)), (i, i, 0)))(h, jnp.argmax(h[:, 0, :, 0], axis=-1))
    return points + unshuffled.reshape(n, 6, 6, 4) + clipped + windows


def _layouts(x):
    """Convs in layouts other than ``nn.Conv``'s, each summed to ``(N, 8)``."""
    nchw, k = jnp.transpose(conv(x), (0, 3, 1, 2)), _W.transpose(3, 2, 0, 1)[:, :, ::-1]
    outs = [jax.lax.conv(nchw[:, :3], k, (1, 2), "SAME"),  # (N, 4, 6, 3)
            jax.lax.conv_general_dilated(nchw[:, :3], k, (1, 1), ((0, 1), (2, 0)),
                                         dimension_numbers=("NCHW", "OIHW", "NHWC")),
            jax.lax.conv_transpose(nchw[:, :3], k[:, :, :2, :2], (2, 2), "SAME",
                                   dimension_numbers=("NCHW", "OIHW", "NCHW")),
            jax.lax.conv_transpose(nchw[:, :3], k * x[:, :1, :1, :1].mean(), (2, 1), "VALID",
                                   dimension_numbers=("NCHW", "OIHW", "NCHW")),
            jax.vmap(lambda r: jnp.convolve(r, np.array([1.0, -2.0, 0.5]), mode="same"))(
                tokens(x)[..., 0])]
    return sum(o.reshape(x.shape[0], -1)[:, :8] for o in outs)


_ORDER = np.random.default_rng(2).permutation(36)
_MESH = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))


# primitive -> a function of an NHWC batch whose jaxpr holds that primitive
CASES = {
    "add": lambda x: conv(x) + first(x),
    "sub": lambda x: conv(x) - 0.25,
    "mul": lambda x: conv(x) * jnp.arange(4.0),
    "div": lambda x: conv(x) / pos(x),
    "pow": lambda x: pos(x) ** (first(x) * 0.5),
    "gt": lambda x: jnp.where(conv(x) > 0.1, 1.0, -1.0),
    "lt": lambda x: jnp.where(conv(x) < 0.1, conv(x), 0.0),
    "eq": lambda x: jnp.where(jnp.floor(conv(x)) == 0.0, 2.0, conv(x)),
    "ge": lambda x: jnp.where(conv(x) >= 0.0, conv(x), 0.0),
    "le": lambda x: jnp.where(conv(x) <= 0.0, conv(x), 0.0),
    "and": lambda x: jnp.where((conv(x) > 0) & (first(x) > 0), 1.0, 0.0),
    "or": lambda x: jnp.where((conv(x) > 0) | (first(x) > 0), 1.0, 0.0),
    "neg": lambda x: -conv(x),
    "exp": lambda x: jnp.exp(conv(x)),
    "log": lambda x: jnp.log(pos(x)),
    "sqrt": lambda x: jnp.sqrt(pos(x)),
    "rsqrt": lambda x: jax.lax.rsqrt(pos(x)),
    "tanh": lambda x: jnp.tanh(conv(x)),
    "logistic": lambda x: jax.nn.sigmoid(conv(x)),
    "abs": lambda x: jnp.abs(conv(x)),
    "erf": lambda x: jax.lax.erf(conv(x)),
    "erfc": lambda x: jax.lax.erfc(conv(x)),
    # (jax.random.truncated_normal, probit transforms; near ±1 it magnifies a last-bit
    # difference in its input): ±1 give ±inf, compared as ±7
    "erf_inv": lambda x: jax.lax.erf_inv(0.9 * jnp.tanh(conv(x))) + jnp.where(jnp.isinf(
        v := jax.lax.erf_inv(jnp.sign(conv(x)))), 7 * jnp.sign(v), v),
    "sign": lambda x: jnp.sign(conv(x)),
    "ne": lambda x: jnp.where(jnp.floor(conv(x)) != 0.0, conv(x), 2.0),
    "expm1": lambda x: jax.nn.elu(conv(x)),
    "log1p": lambda x: jax.nn.softplus(conv(x)),
    "sin": lambda x: jnp.sin(conv(x)),
    "cos": lambda x: jnp.cos(conv(x)),
    "exp2": lambda x: jnp.exp2(conv(x)),
    "round": lambda x: jax.lax.round(jnp.floor(conv(x) * 4) / 2)  # halves: away from zero
    + 10 * jnp.round(jnp.floor(conv(x) * 4) / 2),  # and to even
    "floor": lambda x: jnp.floor(conv(x) * 3),
    "ceil": lambda x: jnp.ceil(conv(x) * 3),
    "max": lambda x: jnp.maximum(conv(x), first(x)),
    "min": lambda x: jnp.minimum(conv(x), 0.5),
    "square": lambda x: jax.lax.square(conv(x)),
    # the dividend's sign (floats, and ints: Flax's flip_sequences wraps its indices by length)
    "rem": lambda x: jax.lax.rem(conv(x) * 3, 0.7) + jax.lax.rem(
        jnp.floor(conv(x) * 5).astype(jnp.int32), 3).astype(jnp.float32),
    "integer_pow": lambda x: conv(x) ** 3,
    "copy": lambda x: jnp.copy(conv(x)),
    # sharding on one device (bonsai's LLaDA runs under an explicit mesh): nothing in a graph
    "reshard": lambda x: jax.sharding.reshard(conv(x), NamedSharding(_MESH, P())),
    "sharding_constraint": lambda x: jax.lax.with_sharding_constraint(
        conv(x), NamedSharding(_MESH, P())),
    "stop_gradient": lambda x: jax.lax.stop_gradient(conv(x)) * 2,
    # static indexing traced with a symbolic batch is a gather from one start: one index
    # (x[:, 1]: a ViT's class token), a point on two axes (Hugging Face's ResNet pooler), a slice
    "gather": lambda x: jnp.take(conv(x), np.array([2, 0, 1, 1, 5]), axis=2)
    + jnp.expand_dims(conv(x)[:, 1], 2) + conv(x)[:, 2, 3][:, None, None] + conv(x)[:, :, 1:]
    # indices clamped (mode="clip"), and the indices' axis first (percentiles of several q)
    + jnp.take(conv(x), np.array([-1, 9, 3, 0, 2]), axis=2, mode="clip")
    + jnp.percentile(conv(x), np.array([10.0, 90.0]), axis=2).transpose(1, 2, 0, 3)[
        :, :, :1],
    # gathers of single elements (GatherND): tokens picked by a score (jnp.take_along_axis), a
    # masked autoencoder's fixed shuffle, several axes indexed at once, one channel per pixel
    "gather_nd": lambda x: jnp.take_along_axis(tokens(x), jax.lax.top_k(
        tokens(x).mean(-1), 3)[1][..., None], axis=1) + jnp.take_along_axis(
        tokens(x), _ORDER[None, :3, None], axis=1) + conv(x)[:, [0, 2, 5], [1, 1, 3]]
    + jnp.take_along_axis(conv(x), jnp.argmax(conv(x), -1, keepdims=True), -1)[:, 0, :3],
    # each row rolled by its own shift (jnp.roll under jax.vmap: Flax's sst2 example flips each
    # padded sequence within its length), a window on a middle axis with a start past the end
    "windows": lambda x: jax.vmap(lambda t, n: jnp.roll(t, n, axis=0))(
        tokens(x), jnp.argmax(tokens(x)[:, :, 0], axis=1)) + jnp.tile(jax.vmap(
        lambda t, n: jax.lax.dynamic_slice_in_dim(t, n, 2, axis=1))(
        tokens(x), jnp.argmax(tokens(x)[:, :, 1], axis=1) * 3), (1, 1, 2)),
    # the row indices of x[jnp.arange(len(x)), idx] (and the batch's size wrapping negative ones)
    "iota": lambda x: tokens(x)[jnp.arange(x.shape[0])[:, None], jax.lax.top_k(
        tokens(x).mean(-1), 5)[1]],
    "dim_as_value": lambda x: conv(x) * x.shape[0] + tokens(x)[jnp.arange(x.shape[0]) - 1][
        :, :6, None],
    # tokens shifted right (Flax's lm1b: dynamic_slice_in_dim(padded, 0, ...)), a start past the
    # end (clamped, as JAX clamps it), a start computed from the data, a constant table read there
    "dynamic_slice": lambda x: jax.lax.dynamic_slice_in_dim(jnp.pad(
        conv(x), ((0, 0), (1, 0), (0, 0), (0, 0))), 0, 6, axis=1) + jax.lax.dynamic_slice_in_dim(
        conv(x), 5, 2, axis=2)[:, :, :1] + jax.lax.dynamic_slice_in_dim(
        conv(x), jnp.argmax(conv(x)[0, 0, :, 0]), 3, axis=2)[:, :, :1] + jax.lax.dynamic_slice(
        np.arange(40.0, dtype=np.float32).reshape(10, 4), (jnp.argmax(conv(x)[0, 0, 0]) + 8, 0),
        (1, 4)),
    # a cache over the batch written at a start computed from the data (clamped past the end,
    # as JAX clamps it; a KV cache written at the decoding position), one row of a batch written
    # with a constant, a constant table written with a tensor
    "dynamic_update_slice": lambda x: jax.lax.dynamic_update_slice_in_dim(
        jnp.zeros((x.shape[0], 10, 6, 4)), conv(x)[:, :2], jnp.argmax(conv(x)[0, 0, :, 0]) * 3,
        axis=1)[:, 2:8] + jax.lax.dynamic_update_slice(conv(x), jnp.ones((1, 2, 2, 4)),
                                                        (0, 1, jnp.argmax(x[0, 0, :, 0]), 0))
    + jax.lax.dynamic_update_slice(jnp.ones((6, 4)), conv(x)[0, 0, :2], (3, 0)),
    # one window written at a known start (an NNX variable assigned as v[...] = y: Qwen 3-VL's
    # KV cache), and a window past the end, dropped as JAX drops it
    "scatter": lambda x: conv(x).at[:, 1:3].set(first(x)[:, :2] * jnp.ones(4)).at[...].set(
        conv(x) * 2).at[:, :, 4:].set(-conv(x)[:, :, :2]) + jnp.zeros((x.shape[0], 6, 6, 4)).at[
        :, 5].set(jnp.ones((x.shape[0], 6, 4))).at[:, jnp.asarray(7)].set(conv(x)[:, 0])
    # and at a position computed from the data (0 to 10: past the end dropped), as a decoder
    # writes its cache
    + conv(x).at[:, jnp.argmax(x[0, 0, :, 0]) * 2].set(first(x)[:, 0] * jnp.ones(4))
    + _scattered(x),
    # repeated indices accumulate; past the end dropped; a segment sum; indices of the data
    "scatter-add": lambda x: conv(x).at[:, :, np.array([4, 0, 4, 9])].add(conv(x)[:, :, :4])
    + jax.ops.segment_sum(tokens(x).transpose(1, 0, 2), np.arange(36) % 6, 6).transpose(
        1, 0, 2)[:, :, None, :] + conv(x).at[:, :, jnp.argmax(x[:, 0, 0], axis=-1) * 4].add(1.0),
    "scatter-mul": lambda x: conv(x).at[:, np.array([1, 1, 3])].multiply(first(x)[:, :3] + 2),
    # ScatterND's max / min are opset 18's: a one-hot pick reduced (runtimes._onnx_rewritten);
    # repeated indices, one past the end dropped; a segment max over every segment
    "scatter-max": lambda x: conv(x).at[:, :, np.array([4, 0, 4, 9])].max(conv(x)[:, :, :4] * 3)
    + jax.ops.segment_max(tokens(x).transpose(1, 0, 2), np.arange(36) % 6, 6).transpose(
        1, 0, 2)[:, :, None, :],
    "scatter-min": lambda x: conv(x).at[:, np.array([1, 1, 5])].min(first(x)[:, :3] - 1),
    "scatter-sub": lambda x: conv(x).at[:, :, np.array([4, 0, 4])].subtract(conv(x)[:, :, :3])
    + conv(x).at[:, np.array([2, 7])].subtract(1.5),
    # a scheduling hint (a remat policy's): its operands as they are
    "optimization_barrier": lambda x: sum(jax.lax.optimization_barrier((conv(x), first(x)))),
    # a model simulating bfloat16 or float16 arithmetic in float32
    # (of values both runtimes compute alike: rounding would magnify a last-bit difference)
    "reduce_precision": lambda x: jax.lax.reduce_precision(x * 1.001, 8, 7)
    + jax.lax.reduce_precision(x * 0.999, 5, 10) + jax.lax.reduce_precision(x, 8, 23),
    "clamp": lambda x: jax.lax.clamp(np.float32(-0.3), conv(x), np.float32(0.4))
    + jax.lax.clamp(first(x) * jnp.ones(4), conv(x), first(x) * jnp.ones(4) + 1),
    "convert_element_type": lambda x: conv(x).astype(jnp.int32).astype(jnp.float32),
    "select_n": lambda x: jax.lax.select(conv(x) > 0, conv(x), first(x) * jnp.ones(4)),
    "reshape": lambda x: conv(x).reshape(x.shape[0], -1),
    "squeeze": lambda x: jnp.squeeze(jax.lax.slice_in_dim(conv(x), 0, 1, axis=1), axis=1),
    "broadcast_in_dim": lambda x: conv(x) + first(jnp.mean(x, axis=(1, 2), keepdims=True)),
    "transpose": lambda x: jnp.transpose(conv(x), (0, 3, 1, 2)),
    # and bounds computed from the symbolic batch, empty pieces concatenated (jnp.pad's edge
    # mode slices x[b-1:b] along every axis, the batch too, and repeats it 0 times there)
    "slice": lambda x: jax.lax.slice(conv(x), (0, 1, 0, 1), (x.shape[0], 5, 6, 3), (1, 2, 2, 1))
    + jnp.pad(conv(x), ((0, 0), (1, 2), (0, 2), (0, 0)), mode="edge")[:, :2, 1:4, 1:3]
    + jax.lax.slice_in_dim(conv(x), x.shape[0] - 1, x.shape[0], axis=0)[:, :2, :3, :2],
    "split": lambda x: jnp.concatenate(jnp.split(conv(x), [1, 3], axis=-1)[::-1], axis=-1)
    + first(jnp.concatenate(jnp.split(x, [3], axis=1)[::-1], axis=1)),
    # per-frame outputs stacked (NCHW conv outputs given a new axis, then the channels last)
    "stack": lambda x: jnp.stack([conv(x), first(x) * jnp.ones(4)], axis=1)
    .sum(1) + jnp.stack([conv(x), conv(x) * 3], axis=-1)[..., 1],
    # reflect padding (built from flips), and a flip of the channels
    "rev": lambda x: jnp.pad(conv(x), ((0, 0), (2, 1), (1, 2), (0, 0)), mode="reflect")[:, :8, :8]
    + jnp.flip(conv(x), axis=-1)[:, :1, :1],
    # a constant repeated over the (symbolic) batch, as a ViT's class token; a tensor tiled
    "tile": lambda x: jnp.tile(jnp.arange(4.0).reshape(1, 1, 1, 4), (x.shape[0], 6, 8, 1))
    + jnp.tile(jax.lax.slice_in_dim(conv(x), 0, 4, axis=2), (1, 1, 2, 1)),
    # and interior padding (values between neighbours: a zero-inserting upsampler), cropped too
    "pad": lambda x: jnp.pad(conv(x), ((0, 0), (1, 2), (0, 1), (0, 0)), constant_values=0.5)
    + jax.lax.pad(conv(x), -1.0, ((0, 0, 0), (1, -2, 1), (0, -4, 1), (0, 0, 0)))[:, :9, :7],
    # and a constant broadcast over the (symbolic) batch first (Hugging Face's ViT class token)
    "concatenate": lambda x: jnp.concatenate([
        jnp.broadcast_to(jnp.arange(42.0).reshape(1, 1, 6, 7), (x.shape[0], 1, 6, 7)),
        jnp.concatenate([conv(x), x], axis=-1)], axis=1),
    "reduce_sum": lambda x: jnp.sum(conv(x), axis=(1, 2)),
    "reduce_max": lambda x: jnp.max(conv(x), axis=(1, 3)),
    "reduce_min": lambda x: jnp.min(conv(x), axis=-1),
    # and of a boolean, the first True (Flax's seq2seq example: each sequence's end)
    "argmax": lambda x: jnp.argmax(conv(x), axis=-1).astype(jnp.float32)
    + jnp.argmax(conv(x) > 0.2, axis=-1),
    # a mixture-of-experts router: the top 2 of the channels (values and indices), and the
    # channels in their order of the spatial axes; cumulative sums, forward and reversed
    "top_k": lambda x: jax.lax.top_k(conv(x), 2)[0] * jax.lax.top_k(conv(x), 2)[1]
    + jnp.swapaxes(jax.lax.top_k(jnp.swapaxes(conv(x), 1, 3), 3)[0], 1, 3)[:, :1, :1, :2],
    "cumsum": lambda x: jnp.cumsum(conv(x), axis=1) + jax.lax.cumsum(conv(x), 3, reverse=True),
    # the rarer math of lrjax.onnx_math
    **{prim: (lambda x, f=f: f(jnp.tanh(conv(x)) * 0.9)) for prim, f in {
        "tan": jnp.tan, "asin": jnp.arcsin, "acos": jnp.arccos, "atan": jnp.arctan,
        "sinh": jnp.sinh, "cosh": jnp.cosh, "asinh": jnp.arcsinh, "atanh": jnp.arctanh,
        "acosh": lambda t: jnp.arccosh(2 + t), "cbrt": lambda t: jnp.cbrt(t - 0.3)}.items()},
    # rounded: zeros of both signs on both axes (atan2's ±0 and ±π), ties (a stable argsort)
    "atan2": lambda x: jnp.arctan2(jnp.round(conv(x)), jnp.round(conv(x)[..., ::-1])),
    "is_finite": lambda x: jnp.where(jnp.isfinite(1 / jnp.round(conv(x))), conv(x), 0.0),
    "not": lambda x: (~(conv(x) > 0)).astype(jnp.float32) + ~jnp.argmax(conv(x), axis=-1)[
        ..., None],
    "xor": lambda x: jnp.logical_xor(conv(x) > 0, conv(x) > 0.5).astype(jnp.float32),
    "argmin": lambda x: jnp.argmin(conv(x), axis=1).astype(jnp.float32),
    "reduce_prod": lambda x: jnp.prod(jnp.tanh(conv(x)), axis=(1, 2)),
    "reduce_and": lambda x: jnp.all(conv(x) > -1, axis=(1, 3)).astype(jnp.float32),
    "reduce_or": lambda x: jnp.any(conv(x) > 1, axis=-1).astype(jnp.float32),
    "cummax": lambda x: jax.lax.cummax(conv(x), 1) + jax.lax.cummax(conv(x), 3, reverse=True),
    "cummin": lambda x: jax.lax.cummin(conv(x), 2),
    "cumprod": lambda x: jax.lax.cumprod(jnp.tanh(conv(x)), 2, reverse=True),
    "cumlogsumexp": lambda x: jax.lax.cumlogsumexp(conv(x), 1),
    "sort": lambda x: jnp.sort(conv(x), axis=1) + jnp.argsort(jnp.round(conv(x)), axis=-1)
    + jnp.median(conv(x), axis=-1, keepdims=True),
    # and other layouts, as model code calls lax itself: a PyTorch port's NCHW / OIHW
    # (``lax.conv``'s default), into NHWC, transposed (``lax.conv_transpose`` of a constant and
    # of a traced kernel), 1-D ``NCW`` (``jnp.convolve``)
    "conv_general_dilated": lambda x: jax.lax.conv_general_dilated(
        x, np.ones((3, 3, 1, 6), np.float32), (2, 1), ((1, 1), (2, 2)), rhs_dilation=(1, 2),
        feature_group_count=3, dimension_numbers=("NHWC", "HWIO", "NHWC")).reshape(
        x.shape[0], -1)[:, :8] + _layouts(x),
    # and a window over 4 axes of a 5-D tensor (unbatched to Flax: Gemma 3's projector pools its
    # image tokens as nnx.avg_pool(x[..., None], (1, 1, k, k))): unit windows folded to the batch
    # and dilated windows (MaxPool's dilations; a sum as a depthwise conv of ones)
    "reduce_window_max": lambda x: jnp.concatenate([nn.max_pool(conv(x), (2, 2), (2, 2)).reshape(
        x.shape[0], -1), nn.max_pool(images(x), (1, 1, 3, 3), padding="SAME").reshape(
        x.shape[0], -1), jax.lax.reduce_window(conv(x), -jnp.inf, jax.lax.max, (1, 2, 3, 1), (
            1, 2, 1, 1), "SAME", window_dilation=(1, 2, 2, 1)).reshape(x.shape[0], -1)], axis=1),
    # min pooling (an erosion): the padding ignored, as -inf in MaxPool
    "reduce_window_min": lambda x: jax.lax.reduce_window(conv(x), jnp.inf, jax.lax.min, (
        1, 3, 2, 1), (1, 1, 1, 1), "SAME") + jax.lax.reduce_window(x, jnp.inf, jax.lax.min, (
            1, 2, 2, 1), (1, 1, 1, 1), ((0, 0), (1, 0), (0, 1), (0, 0)))[..., :1],
    # a pooling JAX keeps general, its init not the op's identity (the padding flags of a framed
    # signal: lax.reduce_window(paddings, 1.0, lax.min, ...)), along the last axis of a 2-D array
    "reduce_window": lambda x: jnp.concatenate([jax.lax.reduce_window(
        conv(x).reshape(x.shape[0], -1), init, op, (1, size), (1, stride), padding)
        for init, op, size, stride, padding in ((0.5, jax.lax.min, 4, 2, "VALID"),
                                                 (0.3, jax.lax.max, 3, 1, "SAME"),
                                                 (1.5, jax.lax.add, 5, 3, "VALID"))], axis=1),
    "reduce_window_sum": lambda x: jnp.concatenate([nn.avg_pool(
        conv(x), (3, 3), (1, 1), padding="SAME").reshape(x.shape[0], -1), nn.avg_pool(
        images(x), (1, 1, 2, 2), (1, 1, 2, 2)).reshape(x.shape[0], -1), jax.lax.reduce_window(
        conv(x), 0.0, jax.lax.add, (1, 3, 2, 1), (1, 1, 2, 1), ((0, 0), (2, 2), (1, 1), (0, 0)),
        window_dilation=(1, 2, 3, 1)).reshape(x.shape[0], -1)], axis=1),
    # and a boolean mask times a float tensor (a mixture-of-experts dispatch), a constant mask
    "dot_general": lambda x: (jnp.mean(conv(x), axis=(1, 2)) @ _D)[:, None] + jax.lax.dot_general(
        conv(x)[:, 0] > 0, conv(x)[:, 1], (((1,), (1,)), ((0,), (0,))),
        preferred_element_type=jnp.float32)[:, :, :1] + jax.lax.dot_general(
        np.eye(4, dtype=bool), jnp.mean(conv(x), axis=1), (((1,), (2,)), ((), ())),
        preferred_element_type=jnp.float32)[:, :, :1].transpose(1, 0, 2)[:, :1, :],
    # a loop of traced length (a solver to a tolerance, a detector's suppression; before: "cannot
    # export primitive 'while'"): ONNX's Loop, in the NCHW layout of the convs around it
    "while": lambda x: _refined(conv(x)),
}


def _refined(y):
    """Halved until small (each example's own count, at most 12), then a fori_loop of traced
    bound: two while loops."""
    def halve(carry):
        step, z = carry
        return step + 1, 0.5 * z + 0.01 * jnp.tanh(z)

    steps, y = jax.lax.while_loop(lambda c: (jnp.abs(c[1]).max() > 0.05) & (c[0] < 12), halve,
                                  (0, y))
    rounds = (jnp.abs(y).sum() > 1).astype(jnp.int32) + 2
    return jax.lax.fori_loop(0, rounds, lambda k, z: z * 1.1 + k, y) + steps


def _primitives(closed) -> set[str]:
    names = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(closed.jaxpr)
    return names


def test_every_handler_has_a_case():
    assert sorted(set(onnx_convert.HANDLERS) - set(CASES)) == []


@pytest.mark.parametrize("primitive", [  # (scatter, 3 s: the slow run)
    pytest.param(p, marks=pytest.mark.slow) if p == "scatter" else p for p in sorted(CASES)])
def test_primitive_against_onnx_runtime(primitive):
    fn = CASES[primitive]
    batch = jax.export.symbolic_shape("b")  # traced as the export traces it
    closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((*batch, *SHAPE[1:]), jnp.float32))
    assert primitive in _primitives(closed) or primitive in ("gather_nd", "windows") and \
        "gather" in _primitives(closed)
    session = runtimes.onnx_session(runtimes.onnx_model(fn, SHAPE))
    for batch in (SHAPE[0], 3):  # the batch dimension is symbolic
        x = np.random.default_rng(batch).standard_normal((batch, *SHAPE[1:])).astype(np.float32)
        want = np.asarray(fn(x))
        got = session.run(None, {"input": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max()))


BOOLEAN_SELECTS = {  # ONNX Runtime has no boolean Where (Flax's Gemma example's window mask)
    "select": lambda x: jnp.where(conv(x) > 0, conv(x) < 1, first(x) > 0),
    "constant case": lambda x: jnp.where(conv(x) > 0, jnp.tril(jnp.ones((6, 4), bool)),
                                         first(x) > 0),
    "branch": lambda x: jax.lax.switch(jnp.clip(jnp.sum(x > 0) % 3, 0, 2),
                                       [lambda y: y > 0, lambda y: y < 0.5, lambda y: y < -0.5],
                                       conv(x)),
}


@pytest.mark.parametrize("case", sorted(BOOLEAN_SELECTS))
def test_boolean_selects_run_in_onnx_runtime(case):
    """A select (or a branch taken on data) between boolean arrays is their logic in ONNX (ONNX
    Runtime refused the model: "Could not find an implementation for Where(16)")."""
    fn = lambda x: BOOLEAN_SELECTS[case](x).astype(jnp.float32)  # noqa: E731
    model = runtimes.onnx_model(fn, SHAPE)
    session = runtimes.onnx_session(model)
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32) * (seed + 1)
        np.testing.assert_array_equal(session.run(None, {"input": x})[0], np.asarray(fn(x)))


def test_a_general_window_reduction_it_cannot_write_is_named():
    """A window product, or a padded window sum from a nonzero init (each padded tap adds it),
    is a translation error naming it."""
    for op, start, match in ((jax.lax.mul, 1.0, r"reduce_window of \['mul'\]"),
                              (jax.lax.add, 1.5, r"padded window sum from init 1\.5")):
        def fn(x, op=op, start=start):
            return jax.lax.reduce_window(conv(x).reshape(x.shape[0], -1), start, op, (1, 3),
                                         (1, 1), "SAME")

        with pytest.raises(onnx_convert.TranslationError, match=match):
            runtimes.onnx_model(fn, SHAPE)


def _branching(x):
    """``lax.cond`` on a predicate of the data, ``lax.switch`` on an index of the data."""
    y = jax.lax.cond(x[0].mean() > 0, lambda t: t * 2.0, lambda t: jnp.tanh(t) - 1.0, conv(x))
    index = jnp.floor(x[0, 0, 0, 0]).astype(jnp.int32)
    return jax.lax.switch(index, [lambda t: t, lambda t: -t, lambda t: t * t], y)


def _every_branch(run, batch: int):
    """``run`` matches JAX on inputs taking every branch of :func:`_branching` (the switch's
    index out of range too: clamped, as JAX clamps it)."""
    rng, taken = np.random.default_rng(0), set()
    for sign in (1.0, -1.0):
        for index in (-3, 0, 1, 2, 7):
            x = np.abs(rng.standard_normal((batch, *SHAPE[1:]))).astype(np.float32) * sign
            x[0, 0, 0, 0] = index + 0.5
            taken.add((float(x[0].mean()) > 0, int(np.clip(index, 0, 2))))
            np.testing.assert_allclose(run(x), _branching(x), rtol=1e-5, atol=1e-5)
    assert taken == {(p, i) for p in (True, False) for i in range(3)}


def test_conditionals_on_data_compute_every_branch_and_select():
    """ONNX: every branch, then ``Where`` (no ``If``: its branches' weights would be hidden from
    ONNX Runtime's folding and fusion); any batch."""
    model = runtimes.onnx_model(_branching, SHAPE)
    assert {"Where"} <= {n.op_type for n in model.graph.node} and \
        "If" not in {n.op_type for n in model.graph.node}
    session = runtimes.onnx_session(model)
    _every_branch(lambda x: session.run(None, {"input": x})[0], 3)


def test_conditionals_on_data_export_to_litert():
    """LiteRT: the same (the converter's ``STABLEHLO_CASE`` failed to prepare in LiteRT's
    interpreter, a raw RuntimeError)."""
    pytest.importorskip("ai_edge_litert")
    data = runtimes.tflite_model(_branching, SHAPE)
    _every_branch(runtimes.litert_runner(runtimes.litert_interpreter(data)), SHAPE[0])


EXPERTS, TOP = 4, 2
_EXPERT_W = np.random.default_rng(5).standard_normal((EXPERTS, 3, 5)).astype(np.float32)


def _mixture_of_experts(x):
    """Gemma 4's routing, written as its ``_moe.py`` writes it: each of the ``b * 36`` pixels
    picks its top-2 experts (``approx_max_k``), the routed rows are sorted by expert (an
    argsort along a multiple of the batch), each expert's weights multiply its rows
    (``ragged_dot``), a per-expert scale is gathered by ``jnp.repeat`` of the counts (a scatter
    onto a multiple of the batch), and the rows go back in order, weighted."""
    rows = x.reshape(-1, 3)
    probs = jax.nn.softmax(rows @ _EXPERT_W[:, :, 0].T, axis=-1)
    weights, choices = jax.lax.approx_max_k(probs, TOP)
    _, least = jax.lax.approx_min_k(probs.T, 1, reduction_dimension=0)  # (1, rows): argmin
    order = choices.ravel().argsort()
    counts = jnp.sum(jax.nn.one_hot(choices, EXPERTS, dtype=jnp.int32), axis=(0, 1))
    routed = jax.lax.ragged_dot(jnp.repeat(rows, TOP, axis=0)[order], _EXPERT_W,
                                group_sizes=counts)
    scale = jnp.repeat(jnp.arange(1, EXPERTS + 1, dtype=jnp.float32), counts,
                       total_repeat_length=routed.shape[0])
    back = (routed * scale[:, None])[order.argsort()].reshape(-1, TOP, 5)
    out = jnp.einsum("rkd,rk->rd", back, weights) + least.T.astype(jnp.float32)
    return out.reshape(*x.shape[:3], 5)


@pytest.mark.slow
def test_a_mixture_of_experts_exports_to_onnx_and_litert():
    """``approx_top_k`` as the exact top k (what JAX computes on CPU), ``ragged_dot`` as a
    dense product masked by group (neither has an ONNX op or a LiteRT kernel: Gemma 4's MoE
    failed both), and a sort, an iota and a scatter along a multiple of the symbolic batch
    (``TopK`` of the whole axis; the scatter's dropped rows sent to a spare slot past it)."""
    for batch in (SHAPE[0], 3):
        x = np.random.default_rng(batch).standard_normal((batch, *SHAPE[1:])).astype(np.float32)
        if batch == SHAPE[0]:
            session = runtimes.onnx_session(runtimes.onnx_model(_mixture_of_experts, SHAPE))
            litert = runtimes.litert_runner(runtimes.litert_interpreter(
                runtimes.tflite_model(_mixture_of_experts, SHAPE)))
            np.testing.assert_allclose(litert(x), _mixture_of_experts(x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(session.run(None, {"input": x})[0], _mixture_of_experts(x),
                                   rtol=1e-5, atol=1e-5)


def test_a_scatter_at_a_computed_position_drops_a_window_past_the_end():
    """``x.at[:, i].set(y)`` with ``i`` computed from the data: written where ``i`` is inside,
    dropped past the end (JAX's ``FILL_OR_DROP``), never clamped."""
    def fn(x):
        return conv(x).at[:, jnp.argmax(x[0, 0, :, 0]) * 2].set(first(x)[:, 0] * jnp.ones(4))

    session = runtimes.onnx_session(runtimes.onnx_model(fn, SHAPE))
    for position in range(6):  # written at rows 0, 2, 4; dropped at 6, 8, 10
        x = np.random.default_rng(position).standard_normal(SHAPE).astype(np.float32)
        x[0, 0, :, 0] = 0.0
        x[0, 0, position, 0] = 5.0
        want = np.asarray(fn(x))
        assert np.array_equal(want, np.asarray(conv(x))) == (position >= 3)
        np.testing.assert_allclose(session.run(None, {"input": x})[0], want, rtol=1e-5,
                                   atol=1e-5)


def _repeat_kv(x):
    """Qwen 3-VL's grouped-query ``repeat_kv``: ``jnp.tile`` of a 5-D tensor, which broadcasts
    to 10 axes."""
    b, t, heads, dim = x.shape
    return jnp.tile(x[:, :, :, None, :], (1, 1, 1, 3, 1)).reshape(b, t, heads * 3, dim) * 2


def test_a_tile_of_five_axes_exports_to_onnx_and_litert():
    """The converter turns a ``tile`` into a broadcast to twice its rank, and LiteRT's
    ``BROADCAST_TO`` takes 8 axes at most (before: "'tfl.broadcast_to' op failed to verify that
    operand 0 is at most 8-D"): it is exported as copies concatenated along each axis."""
    pytest.importorskip("ai_edge_litert")
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    session = runtimes.onnx_session(runtimes.onnx_model(_repeat_kv, SHAPE))
    np.testing.assert_allclose(session.run(None, {"input": x})[0], _repeat_kv(x), rtol=1e-6)
    run = runtimes.litert_runner(runtimes.litert_interpreter(runtimes.tflite_model(
        _repeat_kv, SHAPE)))
    np.testing.assert_allclose(run(x), _repeat_kv(x), rtol=1e-6)


def test_a_model_litert_cannot_run_is_one_line(tmp_path, monkeypatch):
    def fails(data, threads=None):
        raise RuntimeError("tflite/kernels/x.cc:78 2 != 3\nNode number 20 (X) failed to prepare.")

    monkeypatch.setattr(export, "litert_interpreter", fails)
    x = jnp.zeros(SHAPE)
    with pytest.raises(export.ExportError, match=r"^LiteRT's interpreter cannot run the "
                                                 r"converted model: tflite/kernels/x.cc:78 2 != "
                                                 r"3; nothing written$"):
        export.to_tflite(nn.Conv(4, (3, 3)), init(nn.Conv(4, (3, 3)), 0, x), x,
                         str(tmp_path / "m.tflite"))
    assert not list(tmp_path.iterdir())


class Odd(nn.Module):
    """A net with a primitive the translator lacks (a log-gamma function) in a named layer."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="stem")(x)
        return Cumulative(name="head")(x)


class Cumulative(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jax.lax.lgamma(jnp.abs(x) + 1)


def test_unknown_primitive_names_it_and_the_layer(tmp_path):
    model, x = Odd(), jnp.zeros(SHAPE)
    variables = init(model, 0, x)
    with pytest.raises(export.ExportError) as e:
        export.to_onnx(model, variables, x, str(tmp_path / "odd.onnx"))
    message = str(e.value)
    # the layer as the user's variables name it (not the name stack's "Odd/head")
    assert "\n" not in message and "'lgamma'" in message and "(layer head)" in message
    assert not (tmp_path / "odd.onnx").exists()
    split = lrjax.decompose_linen(model, variables, x, rule={"stem": 2})  # a LowRankModel
    with pytest.raises(export.ExportError, match=r"'lgamma' \(layer head\)"):
        export.to_onnx(split.module, split.variables, x, str(tmp_path / "odd.onnx"))


def test_dead_code_and_batch_broadcast_constants_are_exported():
    """Work whose result the outputs never use needs no translation (bonsai's V-JEPA 2 computes
    masked states its classifier drops: a log-gamma function here); a learned token broadcast to the
    symbolic batch and then reshaped is a tensor of the batch (before: 'reshape' failed with
    JAX's UnexpectedDimVar)."""
    token = np.arange(8.0, dtype=np.float32).reshape(1, 2, 4)

    def fn(x):
        dropped = jax.lax.lgamma(pos(x))  # noqa: F841 - computed, never returned
        batched = jnp.broadcast_to(token, (x.shape[0], 2, 4)).reshape(x.shape[0], 1, 2, 4)
        return conv(x)[:, :2, :2] + batched

    session = runtimes.onnx_session(runtimes.onnx_model(fn, SHAPE))
    for batch in (SHAPE[0], 3):
        x = np.random.default_rng(batch).standard_normal((batch, *SHAPE[1:])).astype(np.float32)
        np.testing.assert_allclose(session.run(None, {"input": x})[0], fn(x), rtol=1e-5,
                                   atol=1e-5)


def test_uncovered_forms_are_one_line_errors(tmp_path):
    def cropping(x):  # a conv with negative padding (cropping its input)
        return jax.lax.conv_general_dilated(
            tokens(x), np.ones((3, 4, 2), np.float32), (1,), ((-1, 0),),
            dimension_numbers=("NWC", "WIO", "NWC"))

    with pytest.raises(onnx_convert.TranslationError,
                       match=r"^cannot export primitive 'conv_general_dilated' \(layer .*\) to "
                             r"ONNX: a conv with batch_group_count != 1 or padding"):
        runtimes.onnx_model(cropping, SHAPE)


def test_a_1d_transposed_conv_exports():
    """An input-dilated conv of one spatial axis (before: "a transposed conv of 1 spatial
    dimensions", one line) as ONNX ``ConvTranspose``."""
    def transposed_1d(x):
        return jax.lax.conv_transpose(tokens(x), np.ones((3, 4, 2), np.float32), (2,), "SAME",
                                      dimension_numbers=("NWC", "WIO", "NWC"))

    session = runtimes.onnx_session(runtimes.onnx_model(transposed_1d, SHAPE))
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"input": x})[0], transposed_1d(x), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("kernel,strides,padding,dilation", [
    ((3, 3), (2, 2), "SAME", 1), ((2, 2), (2, 2), "VALID", 1), ((4, 3), (2, 1), "SAME", 1),
    ((3, 3), (3, 2), ((1, 2), (0, 1)), (2, 1)), ((3, 3), (1, 1), "SAME", 1),
    ((3, 3), (2, 2), ((3, 1), (0, 4)), 1)])
def test_transposed_convs_export(kernel, strides, padding, dilation, tmp_path):
    """nn.ConvTranspose (a U-Net's upsampler) as ONNX's own ConvTranspose (only the real input
    elements multiplied); padding beyond the kernel's extent as zero insertion, then a Conv."""
    model = nn.ConvTranspose(5, kernel, strides=strides, padding=padding,
                             kernel_dilation=dilation)
    x = jax.random.normal(jax.random.key(0), SHAPE)
    variables = init(model, 0, x)
    result = export.to_onnx(model, variables, x, str(tmp_path / "up.onnx"))
    assert result.max_abs_error <= export.ATOL + export.RTOL * result.scale
    ops = {node.op_type for node in onnx.load(result.path).graph.node}
    native = strides != (1, 1) and padding != ((3, 1), (0, 4))
    assert ("ConvTranspose" in ops) == native and ("Conv" in ops) == (not native)


# what modern CNNs put after a conv: each exported on its own (a conv first, so the layout logic
# is exercised), and all of them in one model for LiteRT
ACTIVATIONS = {
    "gelu (erf)": lambda x: nn.gelu(x, approximate=False),
    "gelu (tanh)": lambda x: nn.gelu(x, approximate=True),
    # as Hugging Face's and bonsai's Whisper write it (LiteRT's converter has erfc, not erf)
    "gelu (lax.erf)": lambda x: x * 0.5 * (1.0 + jax.lax.erf(x / np.sqrt(2.0))),
    "silu": nn.silu,
    "hard-swish": nn.hard_swish,
    "softmax": lambda x: nn.softmax(x, axis=-1),
    "layer norm": lambda x: nn.LayerNorm(name="ln")(x),
    "resize (nearest)": lambda x: jax.image.resize(x, (x.shape[0], 9, 12, x.shape[3]), "nearest"),
    "resize (bilinear)": lambda x: jax.image.resize(x, (x.shape[0], 12, 9, x.shape[3]),
                                                    "bilinear"),
    "dense on N,1,1,C (squeeze-excite)": lambda x: nn.Dense(4, name="se")(
        jnp.mean(x, axis=(1, 2), keepdims=True)) * x,
    "DenseGeneral over two axes": lambda x: nn.DenseGeneral((2, 3), axis=(-2, -1), name="dg")(x),
    "einsum (attention scores)": lambda x: jnp.einsum(
        "bqc,bkc->bqk", x.reshape(x.shape[0], -1, 4), x.reshape(x.shape[0], -1, 4)),
}


class After(nn.Module):
    names: tuple

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="conv")(x)
        outs = [ACTIVATIONS[n](x).reshape(x.shape[0], -1) for n in self.names]
        return jnp.concatenate(outs, axis=-1)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_modern_cnn_layers_export_to_onnx(name, tmp_path):
    model, x = After((name,)), jax.random.normal(jax.random.key(0), SHAPE)
    variables = init(model, 1, x)
    result = export.to_onnx(model, variables, x, str(tmp_path / "m.onnx"))
    assert result.checked_batches == (2, 3)
    assert result.max_abs_error <= export.ATOL + export.RTOL * result.scale


def test_modern_cnn_layers_export_to_litert(tmp_path):
    pytest.importorskip("ai_edge_litert")
    model, x = After(tuple(sorted(ACTIVATIONS))), jax.random.normal(jax.random.key(0), SHAPE)
    variables = init(model, 1, x)
    result = export.to_tflite(model, variables, x, str(tmp_path / "m.tflite"))
    assert result.max_abs_error <= export.ATOL + export.RTOL * result.scale


def test_dense_on_one_pixel_exports_to_litert_at_batch_1(tmp_path):
    """A dense layer on (1, 1, 1, C) (squeeze-excite at batch 1) becomes a rank-4 batch_matmul
    the TFLite converter rejects; the export computes it as the 1x1 conv it is, split or not."""
    pytest.importorskip("ai_edge_litert")
    import lrjax

    model, x = After(("dense on N,1,1,C (squeeze-excite)",)), jnp.ones((1, *SHAPE[1:]))
    variables = init(model, 1, x)
    split = lrjax.decompose_linen(model, variables, x, rule={"se": 2})
    for module, v in ((model, variables), (split.module, split.variables)):
        result = export.to_tflite(module, v, x, str(tmp_path / "se.tflite"))
        assert result.max_abs_error <= export.ATOL + export.RTOL * result.scale


def test_gathers_out_of_range_are_clamped_or_filled_as_in_jax():
    """ONNX Runtime rejects a ``GatherND`` index out of range ("invalid index found"), where JAX
    clamps (indexing) or fills (``mode="fill"``): scenic's CenterNet2 suppression read such rows.
    The indices are graph inputs, the batch symbolic."""
    def fn(x, i):
        rows = jnp.arange(x.shape[0])[:, None]
        return (x[rows, i], jnp.take_along_axis(x, i, axis=1, mode="fill", fill_value=-7.0),
                x.at[rows, i].get(mode="fill"))

    batch = jax.export.symbolic_shape("b")
    closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((*batch, 6), jnp.float32),
                                jax.ShapeDtypeStruct((*batch, 3), jnp.int32))
    model = onnx_convert.jaxpr_to_onnx(closed, ("x", "i"), ("a", "b", "c"))
    session = runtimes.onnx_session(model)
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    i = np.asarray([[0, 5, 9], [2, -1, 3], [6, 1, -8]], np.int32)
    for got, want in zip(session.run(None, {"x": x, "i": i}), jax.jit(fn)(x, i), strict=True):
        np.testing.assert_array_equal(got, np.asarray(want))


def test_a_scan_as_long_as_the_batch_is_a_loop_of_that_many_iterations():
    """``lax.map`` over the examples (an unrolled solver per image), and a reversed scan over
    them: a scan of symbolic length, before "cannot export primitive 'scan'" (its length no
    int); ONNX's ``Loop``, which stacks the per-iteration outputs."""
    kernel = np.random.default_rng(0).standard_normal((3, 3, 3, 4)).astype(np.float32)

    def per_example(image):
        y = jax.lax.conv_general_dilated(image[None], kernel, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]
        z, sums = jax.lax.scan(lambda z, _: (0.5 * z + 0.1 * jnp.tanh(z), z.sum()), y, None,
                               length=3)
        return z.mean(axis=(0, 1)), sums

    def fn(x):
        means, sums = jax.lax.map(per_example, x)
        _, maxima = jax.lax.scan(lambda c, row: (c + row.sum(), row.max() + c), 0.0, x,
                                 reverse=True)
        return means, sums, maxima

    batch = jax.export.symbolic_shape("b")
    closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((*batch, 6, 6, 3), jnp.float32))
    model = onnx_convert.jaxpr_to_onnx(closed, ("input",), ("a", "b", "c"))
    assert [n.op_type for n in model.graph.node].count("Loop") == 2
    session = runtimes.onnx_session(model)
    for n in (2, 5):
        x = np.random.default_rng(n).standard_normal((n, 6, 6, 3)).astype(np.float32)
        for got, want in zip(session.run(None, {"input": x}), fn(x), strict=True):
            np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-4)
