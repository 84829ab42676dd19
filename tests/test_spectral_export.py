"""Spectral layers (complex values between real inputs and outputs) exported to ONNX Runtime and
LiteRT, neither of which takes complex tensors: :mod:`lrjax.complex_real` replays them with real
and imaginary parts and each FFT as products with the DFT's cosine and sine matrices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrjax
from lrjax import complex_real, export
from tests.helpers import init, xla_flops

pytest.importorskip("onnxruntime")


class FNetMixing(nn.Module):
    """FNet's token mixing (``jnp.fft.fftn`` over tokens and features, real part) between two
    dense layers, on ``(batch, tokens, features)``."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, name="embed")(x)
        return nn.Dense(8, name="head")(jax.vmap(jnp.fft.fftn)(x).real + x)


class GlobalFilter(nn.Module):
    """GFNet's global filter on NHWC: ``irfft2(rfft2(x) * w)`` with a learned complex ``w``
    stored as its two real parts, next to a 1x1 conv."""

    @nn.compact
    def __call__(self, x):
        h, w, c = x.shape[1:]
        weight = self.param("complex_weight", nn.initializers.normal(0.5), (h, w // 2 + 1, c, 2))
        spectrum = jnp.fft.rfft2(x, axes=(1, 2), norm="ortho")
        spectrum = spectrum * jax.lax.complex(weight[..., 0], weight[..., 1])
        return jnp.fft.irfft2(spectrum, s=(h, w), axes=(1, 2), norm="ortho") + nn.Conv(
            c, (1, 1), name="pointwise")(x)


class LongConv(nn.Module):
    """S4's / Hyena's long convolution by FFT on ``(batch, length, channels)``: an odd and an
    even transform length, then a dense layer."""

    @nn.compact
    def __call__(self, u):
        length = u.shape[1]
        kernel = self.param("kernel", nn.initializers.normal(0.3), (length, u.shape[2]))
        y = jnp.fft.irfft(jnp.fft.rfft(u, n=2 * length, axis=1) * jnp.fft.rfft(
            kernel, n=2 * length, axis=0), n=2 * length, axis=1)[:, :length]
        odd = jnp.fft.irfft(jnp.fft.rfft(u, n=2 * length + 1, axis=1), n=2 * length + 1,
                            axis=1)[:, :length]
        return nn.Dense(u.shape[2], name="out")(y + odd)


class ComplexMath(nn.Module):
    """Complex arithmetic between FFTs: a complex input built from two real ones, products,
    quotients, ``exp``, ``conj``, ``abs``, a cast to float, inverse FFTs over one and two axes,
    odd lengths; and a basis computed in the call from constants alone, as S4 computes its HiPPO
    basis (``eigh`` of a complex Hermitian matrix: evaluated at export, then a complex matrix
    product)."""

    @nn.compact
    def __call__(self, x):
        z = jnp.fft.fft(x[..., :5] + 1j * x[..., 1:6], axis=-1)
        w = jnp.exp(z * 0.1j) / (z + 2.0) * jnp.conj(z)
        n = jnp.arange(5.0)
        _, basis = jnp.linalg.eigh(jnp.sqrt(n[:, None] + n[None, :] + 1) * (
            1j * jnp.sign(n[:, None] - n[None, :])))
        return jnp.abs(jnp.fft.ifft(w, axis=-2)) + jnp.real(jnp.fft.ifft2(z, axes=(1, 2))) \
            + jnp.imag(z @ basis) + jax.lax.convert_element_type(z, jnp.float32)  # real part


class Spectrogram(nn.Module):
    """An audio front end as AlgoPerf's Conformer computes one on ``(batch, samples)``: frames
    of the signal plus a noise term made from constants alone but as long as the batch
    (``jnp.zeros(frames.shape)``: symbolic at export, staged, not evaluated), the magnitude of
    their real FFT, its log, then a dense layer; and the batch's size as a value (DeepSpeech's
    lengths of a padded batch)."""

    @nn.compact
    def __call__(self, x):
        frames = x.reshape(x.shape[0], -1, 8)
        noise = jnp.zeros(frames.shape) * jnp.asarray(x.shape[0], jnp.float32)
        spectrum = jnp.abs(jnp.fft.rfft(frames + noise, 16, axis=2))
        return nn.Dense(4, name="proj")(jnp.log(jnp.maximum(spectrum, 1e-5)))


class MelFrontEnd(nn.Module):
    """google-research/perch's ``MelSpectrogram``: ``jax.scipy.signal.stft`` (its frames a gather
    of windows at constant starts), the power of its bins, a mel matrix, a log."""

    @nn.compact
    def __call__(self, x):
        _, _, stft = jax.scipy.signal.stft(x, nperseg=16, noverlap=12, padded=False)
        power = jnp.swapaxes(jnp.abs(stft) ** 2, -1, -2)  # (batch, frames, bins)
        mel = jnp.asarray(np.random.default_rng(0).uniform(size=(power.shape[-1], 6)),
                          jnp.float32)
        return nn.Dense(4, name="proj")(jnp.log(jnp.maximum(power @ mel, 1e-5)))


class GaborFrontEnd(nn.Module):
    """google-research/perch's ``MorletWaveletTransform``: complex Gabor filters made from two
    learned parameters, convolved with the real signal (a complex conv), the power of each."""

    @nn.compact
    def __call__(self, x):
        mean = self.param("mean", lambda k: jnp.linspace(0.1, 1.2, 6))
        std = self.param("std", lambda k: jnp.full((6,), 3.0))
        t = jnp.arange(-7, 8, dtype=jnp.float32)[:, None]
        filters = jnp.exp(-0.5 * (t / std) ** 2) * jnp.exp(1j * mean * t)  # (15, 6)
        y = jax.lax.conv_general_dilated(x[..., None].astype(jnp.complex64), filters[:, None],
                                         (4,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
        return nn.Dense(4, name="proj")(jnp.log1p(jnp.abs(y) ** 2))


def _circular(v, spectrum):
    """A circular convolution of ``(..., H, W)`` images by FFT, as lanl/scico's
    ``CircularConvolve`` computes one; real images."""
    return jnp.real(jnp.fft.ifft2(jnp.fft.fft2(v) * spectrum))


def _conjugate_gradients(normal, b, steps=3):
    """lanl/scico's ``cg_solver``: ``steps`` iterations in a ``lax.scan``, the residual's squared
    norm a 0-d carry computed from data."""
    def step(carry, _):
        x, r, p, norm = carry
        normal_p = normal(p)
        alpha = norm / (p.ravel() @ normal_p.ravel())
        x, r = x + alpha * p, r - alpha * normal_p
        new_norm = r.ravel() @ r.ravel()
        return (x, r, r + new_norm / norm * p, new_norm), None

    (x, *_), _ = jax.lax.scan(step, (jnp.zeros_like(b), b, b, b.ravel() @ b.ravel()), None,
                              length=steps)
    return x


class UnrolledSolver(nn.Module):
    """An unrolled inverse solver as lanl/scico's MoDL runs one on NHWC: a conv denoiser, then a
    conjugate-gradient solve of ``(A^T A + I / 2) x = A^T y + z`` for a circular blur ``A`` by
    FFT (its adjoint summing over no axis, ``jnp.sum(axis=())``, as scico's does for an
    operator without batch axes) inside ``lax.map``, over each channel (``over_batch``: over
    each example, MoDL's own loop, which needs a fixed batch); and a spectrum summed in a
    ``scan``'s complex carry."""
    over_batch: bool = False

    @nn.compact
    def __call__(self, y):
        blur = jnp.fft.fft2(jnp.ones((3, 3)) / 9, s=y.shape[1:3])

        def adjoint(v):
            return jnp.sum(_circular(v, jnp.conj(blur)), axis=())

        def normal(v):
            return adjoint(_circular(v, blur)) + 0.5 * v

        z = nn.Conv(y.shape[-1], (3, 3), padding="CIRCULAR", name="denoiser")(y)
        b = jnp.moveaxis(adjoint(jnp.moveaxis(y, -1, 1)), 1, -1) + z
        if self.over_batch:
            x = jax.lax.map(lambda image: jnp.stack([_conjugate_gradients(
                normal, image[..., c]) for c in range(image.shape[-1])], -1), b)
        else:
            x = jnp.moveaxis(jax.lax.map(lambda channel: _conjugate_gradients(normal, channel),
                                         jnp.moveaxis(b, -1, 0)), 0, -1)
        spectrum, _ = jax.lax.scan(lambda total, image: (total + jnp.fft.fft2(image), None),
                                   jnp.zeros(y.shape[:3], jnp.complex64), jnp.moveaxis(y, -1, 0))
        return x + 0.01 * jnp.abs(spectrum)[..., None]


MODELS = {"fnet": (FNetMixing, (2, 12, 6)), "global filter": (GlobalFilter, (2, 8, 6, 4)),
          "long conv": (LongConv, (2, 10, 4)), "complex math": (ComplexMath, (2, 7, 5, 6)),
          "spectrogram": (Spectrogram, (2, 48)), "stft": (MelFrontEnd, (2, 64)),
          "gabor": (GaborFrontEnd, (2, 64)), "unrolled solver": (UnrolledSolver, (2, 8, 8, 2))}


def _example(name):
    cls, shape = MODELS[name]
    model, x = cls(), jax.random.normal(jax.random.key(0), shape)
    return model, init(model, 1, x), x if len(shape) == 4 else (x,)


@pytest.mark.filterwarnings("ignore::numpy.exceptions.ComplexWarning")  # the cast, on purpose
@pytest.mark.parametrize("name", [  # (three of the FFT-based nets, and the unrolled solver, which
    # test_an_unrolled_solver_exports_to_both_runtimes exports to ONNX too: the slow run)
    pytest.param(n, marks=pytest.mark.slow) if n in ("global filter", "long conv", "fnet",
                                                     "unrolled solver", "gabor") else n
    for n in sorted(MODELS)])
def test_spectral_layers_export_to_onnx(name, tmp_path):
    model, variables, x = _example(name)
    result = export.to_onnx(model, variables, x, str(tmp_path / "m.onnx"))
    assert result.checked_batches == (2, 3)
    assert result.max_abs_error <= export.ATOL + export.RTOL * result.scale


@pytest.mark.slow  # seven LiteRT conversions
@pytest.mark.filterwarnings("ignore::numpy.exceptions.ComplexWarning")
def test_spectral_layers_export_to_litert(tmp_path):
    pytest.importorskip("ai_edge_litert")
    for name in sorted(MODELS):
        model, variables, x = _example(name)
        result = export.to_tflite(model, variables, x, str(tmp_path / "m.tflite"))
        assert result.max_abs_error <= export.ATOL + export.RTOL * result.scale, name


@pytest.mark.slow
def test_an_unrolled_solver_exports_to_both_runtimes(tmp_path):
    """MoDL's loop over the examples (``lax.map`` of a conjugate-gradient ``scan`` with FFTs
    inside) to ONNX at a fixed batch (a loop as long as the batch); the loop over channels to
    LiteRT, whose converter crashed the process on the inner loop's 0-d carry scaling an array
    (held as a ``(1,)`` array now)."""
    pytest.importorskip("ai_edge_litert")
    y = jax.random.normal(jax.random.key(0), (2, 8, 8, 2))
    for model, to_runtime, path, kwargs in (
            (UnrolledSolver(over_batch=True), export.to_onnx, "m.onnx", {"fixed_batch": True}),
            (UnrolledSolver(), export.to_tflite, "m.tflite", {})):
        variables = init(model, 1, y)
        result = to_runtime(model, variables, (y,), str(tmp_path / path), **kwargs)
        assert result.max_abs_error <= export.ATOL + export.RTOL * result.scale


def test_the_dft_matrices_match_numpys_transforms():
    """Each FFT type against NumPy's on a complex or real array, several axes and odd and even
    lengths, through the replay of a traced program."""
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((3, 5, 6)) + 1j * rng.standard_normal((3, 5, 6))).astype(np.complex64)
    r = rng.standard_normal((3, 5, 6)).astype(np.float32)
    cases = {
        "fft": (lambda a: jnp.fft.fftn(a, axes=(1, 2)), z, np.fft.fftn(z, axes=(1, 2))),
        "ifft": (lambda a: jnp.fft.ifft(a, axis=-1), z, np.fft.ifft(z, axis=-1)),
        "rfft": (lambda a: jnp.fft.rfftn(a, axes=(1, 2)), r, np.fft.rfftn(r, axes=(1, 2))),
        "irfft": (lambda a: jnp.fft.irfftn(a, s=(5, 7), axes=(1, 2)), z[:, :, :4],
                  np.fft.irfftn(z[:, :, :4], s=(5, 7), axes=(1, 2))),
    }
    for kind, (fn, value, want) in cases.items():
        closed = jax.make_jaxpr(lambda a, fn=fn: (jnp.real(fn(a)), jnp.imag(fn(a))))(value)
        assert complex_real.holds_complex(closed)
        got = complex_real.replayed(closed)(value)
        np.testing.assert_allclose(got[0] + 1j * got[1], want, rtol=1e-4, atol=1e-4,
                                   err_msg=kind)


def test_uncovered_complex_ops_are_one_line_errors(tmp_path):
    class Sqrt(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.real(jnp.sqrt(jnp.fft.fft(nn.Dense(4, name="proj")(x), axis=-1)))

    class ComplexOut(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.fft.fft(x, axis=-1)

    x = jax.random.normal(jax.random.key(0), (2, 3, 4))
    for model, pattern in ((Sqrt(), r"^cannot export primitive 'sqrt' \(layer .*\) to ONNX: "
                                     r"complex values in it have no real form"),
                           (ComplexOut(), r"a complex output: return its real and imaginary")):
        with pytest.raises(export.ExportError, match=pattern) as caught:
            export.to_onnx(model, init(model, 0, x), (x,), str(tmp_path / "m.onnx"))
        assert "\n" not in str(caught.value)


def test_spectral_nets_decompose_with_the_whole_net_cost():
    """The dense layers around FNet's mixing split; the report's whole-net speedup is XLA's."""
    model, variables, (x,) = _example("fnet")
    result = lrjax.decompose_linen(model, variables, x, rule="speedup:1.2")
    flops = [xla_flops(lambda v, a, m=m: m.apply(v, a), v, x)
             for m, v in ((model, variables), (result.module, result.variables))]
    assert flops[0] / flops[1] == pytest.approx(result.report.speedup, rel=5e-3)
