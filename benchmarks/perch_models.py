"""google-research/perch's bird-song models, as published: found layers, whole-net `speedup:2`
data-free and calibrated (seconds, the report against XLA's own flop count), and the export to
ONNX Runtime and LiteRT.

Two models of its ``chirp/models`` (linen), on random audio: the ``TaxonomyModel`` classifier (its
``MelSpectrogram`` front end, ``jax.scipy.signal.stft`` and a mel matrix, then an
``EfficientNet`` B0 and two heads; 1 s at 16 kHz) and the ``SeparationModel`` (its learned
analysis filterbank, a 128-tap stride-32 1-D conv, a ``SoundstreamUNet`` mask generator whose
upsamplers are 1-D transposed convs, the learned synthesis filterbank, a 128-tap stride-32 1-D
transposed conv, and a bottleneck classifier; 6400 samples). Random weights: the published
initialization perturbed by 0.05 (its zero-initialized batch-norm scales would make every
output vanish). They are imported unmodified from a checkout given by path (this machine has no
network: ``git clone https://github.com/google-research/perch`` elsewhere); the packages its
modules import for audio files and quantized training (``librosa``, ``soundfile``, ``aqt``),
which these models do not run, are stood in for.

    python -m benchmarks.perch_models --perch ~/src/perch --json bench_results/perch_models.json
"""

from __future__ import annotations

import argparse
import os
import sys
import types

from benchmarks.common import checkout_args, checkout_run, setup
from benchmarks.public_models import _table, decomposition_row, exported

MODELS = {"taxonomy_b0": 16000, "separation": 6400}  # name: samples per example


def _stand_ins() -> None:
    """Modules perch imports at the top of files these models use, for reading audio files
    and quantized training, none of which runs here."""
    def module(name, **attributes):
        sys.modules.setdefault(name, types.ModuleType(name)).__dict__.update(attributes)

    import jax

    for name in ("librosa", "soundfile", "aqt", "aqt.jax", "aqt.jax.v2"):
        module(name)
    module("aqt.jax.v2.aqt_conv_general",
           make_conv_general_dilated=lambda *a, **k: jax.lax.conv_general_dilated)
    module("aqt.jax.v2.config", conv_general_dilated_make=lambda *a, **k: None)


def build(name: str):
    """The named model of perch's ``chirp.models``."""
    from chirp.models import efficientnet, frontend, separation_model, soundstream_unet, taxonomy_model

    if name == "taxonomy_b0":
        return taxonomy_model.TaxonomyModel(
            num_classes={"label": 10, "genus": 5},
            encoder=efficientnet.EfficientNet(model=efficientnet.EfficientNetModel.B0),
            frontend=frontend.MelSpectrogram(
                features=64, stride=160, kernel_size=512, sample_rate=16000,
                freq_range=(60, 8000), scaling_config=frontend.LogScalingConfig()))
    return separation_model.SeparationModel(
        bank_transform=frontend.LearnedFrontend(features=32, stride=32, kernel_size=128),
        unbank_transform=frontend.InverseLearnedFrontend(stride=32, kernel_size=128),
        mask_generator=soundstream_unet.SoundstreamUNet(
            base_filters=16, bottleneck_filters=16, output_filters=64, num_residual_layers=2,
            strides=(5, 2, 2), feature_mults=(2, 2, 2), groups=(1, 1, 1), unet_scalar=1.0),
        num_mask_channels=4, mask_kernel_size=3, bank_is_real=True, classify_bottleneck=True,
        classify_pool_width=5, classify_stride=5, classify_features=32,
        num_classes={"label": 10})


def measure(model, audio, calibration, *, tmp_dir: str, exporters=("onnx", "tflite")) -> dict:
    """One model's row, called as ``model.apply(variables, audio, train=False)``."""
    import flax
    import jax

    variables = jax.jit(lambda key, a: model.init(key, a, train=False))(jax.random.key(1), audio)
    params = flax.core.unfreeze(variables["params"])
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    variables = {**variables, "params": jax.tree.unflatten(tree, [
        p + 0.05 * jax.random.normal(k, p.shape, p.dtype)
        for p, k in zip(leaves, keys, strict=True)])}

    def flops(m, v, compiled):
        lowered = jax.jit(lambda v, a: m.apply(v, a, train=False)).lower(v, audio)
        return (lowered.compile() if compiled else lowered).cost_analysis()["flops"]

    row = decomposition_row(model, variables, (audio,), calibration, flops, train=False)
    row.update(exported(row.pop("result"), (audio,), tmp_dir=tmp_dir, exporters=exporters,
                        train=False))
    return row


def main(argv=None) -> dict:
    setup()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args, names = checkout_args(
        parser, argv, flag="--perch", found=os.path.join("chirp", "models"),
        help="a checkout of github.com/google-research/perch", models=MODELS,
        json="bench_results/perch_models.json")

    import jax

    _stand_ins()
    sys.path.insert(0, os.path.abspath(args.perch))

    def row_of(name, tmp):
        samples = MODELS[name]
        audio = jax.random.normal(jax.random.key(0), (args.batch, samples))
        calibration = jax.random.normal(jax.random.key(7), (args.calibration_images, samples))
        return measure(build(name), audio, calibration, tmp_dir=tmp)

    return checkout_run("perch_models", argv, ("perch", args.perch), names, row_of, _table,
                        args.json)


if __name__ == "__main__":
    main()
