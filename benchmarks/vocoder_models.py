"""A public Flax vocoder written with Flax's ``nn.WeightNorm``, as published: found layers,
whole-net `speedup:2` data-free and calibrated (seconds, the report against XLA's own flop
count), and the export to ONNX Runtime and LiteRT.

flyingblackshark/jax-nsf-hifigan's ``Generator`` (linen; an NSF-HiFiGAN port): every conv
(1-D, dilated) and every upsampler (a 1-D ``nn.ConvTranspose(transpose_kernel=True)``) made in
``setup`` inside ``nn.WeightNorm``, in lists; a harmonic-plus-noise source drawing randomness at
inference (``rngs={"rnorms": key}``), run through strided 1-D convs. A small configuration:
upsample rates 4, 4 (kernels 8, 8), 64 initial channels, resblock kernels 3 and 7, 32 mel bins
of 16 frames, batch 2. lrjax folds each ``WeightNorm`` into the weights its layer computes with
(:mod:`lrjax.linen_wrappers`). ONNX at ``fixed_batch=True`` (the random draw is of the batch's
shape).

The repository is imported from a checkout given by path (this machine has no network:
``git clone https://github.com/flyingblackshark/jax-nsf-hifigan`` elsewhere); the modules its
``models.py`` imports for its own ``__main__`` (``torch``, ``omegaconf``, its ``util``'s
``librosa`` and ``audax``) are stood in for.

    python -m benchmarks.vocoder_models --nsf ~/src/jax-nsf-hifigan --json bench_results/vocoder_models.json
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types

from benchmarks.common import checkout_args, checkout_run, setup
from benchmarks.public_models import _table, decomposition_row, exported

MODELS = ("nsf_hifigan",)
_CONFIG = dict(upsample_rates=[4, 4], upsample_kernel_sizes=[8, 8], upsample_initial_channel=64,
               resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
               sampling_rate=16000)
_MELS, _FRAMES = 32, 16


def _stand_ins() -> None:
    """Empty modules for what ``models.py`` imports and never calls here (``torch`` and
    ``omegaconf`` only where they are not installed; the checkout's ``util``, whose ``librosa``
    and ``audax`` imports the model does not need, always)."""
    for name in ("torch", "omegaconf", "util"):
        if name != "util" and importlib.util.find_spec(name) is not None:
            continue
        module = types.ModuleType(name)
        module.OmegaConf = module.get_mel = None
        sys.modules[name] = module


def inputs(batch: int, seed: int) -> tuple:
    """``(mel, f0)``: random mel frames ``(batch, mels, frames)`` and pitches in Hz."""
    import jax

    keys = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(keys[0], (batch, _MELS, _FRAMES)),
            100 + 50 * jax.random.uniform(keys[1], (batch, _FRAMES)))


def measure(model, args, calibration, *, tmp_dir: str) -> dict:
    import jax

    keywords = {"train": False, "rngs": {"rnorms": jax.random.key(7)}}
    variables = jax.jit(lambda key: model.init({"params": key, "rnorms": key}, *args,
                                               train=False))(jax.random.key(0))

    def flops(m, v, compiled):
        lowered = jax.jit(lambda v, *a: m.apply(v, *a, **keywords)).lower(v, *args)
        return (lowered.compile() if compiled else lowered).cost_analysis()["flops"]

    row = decomposition_row(model, variables, args, calibration, flops, **keywords)
    result = row.pop("result")
    row["folded_wrappers"] = len(result.module.unwrapped)
    row.update(exported(result, args, tmp_dir=tmp_dir, exporters=("onnx",),
                        onnx_kwargs={"fixed_batch": True}, **keywords))
    row.update(exported(result, args, tmp_dir=tmp_dir, exporters=("tflite",), **keywords))
    return row


def main(argv=None) -> dict:
    setup()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args, names = checkout_args(
        parser, argv, flag="--nsf", found="models.py",
        help="a checkout of github.com/flyingblackshark/jax-nsf-hifigan", models=MODELS,
        json="bench_results/vocoder_models.json")
    _stand_ins()
    sys.path.insert(0, os.path.abspath(args.nsf))

    def row_of(name, tmp):
        import models

        calibration = [inputs(args.batch, 1 + i) for i in range(
            max(1, args.calibration_images // args.batch))]
        return measure(models.Generator(types.SimpleNamespace(**_CONFIG)),
                       inputs(args.batch, 0), calibration, tmp_dir=tmp)

    return checkout_run("vocoder_models", argv, ("nsf", args.nsf), names, row_of, _table,
                        args.json)


if __name__ == "__main__":
    main()
