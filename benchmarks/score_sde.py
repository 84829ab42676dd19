"""Score-based diffusion U-Nets written by others, as published: found layers, whole-net
`speedup:2` data-free and calibrated (seconds, the report against XLA's own flop count), and the
export to ONNX Runtime and LiteRT.

The models are yang-song/score_sde's NCSN++, DDPM++ and DDPM (linen, 2021: two inputs, images
and noise levels; GroupNorm, attention written with its own ``NIN`` dense layers, FIR up and
down sampling by its own ``upfirdn2d``), imported unmodified from a checkout given by path (this
machine has no network: ``git clone https://github.com/yang-song/score_sde`` elsewhere; its
``models/utils.py`` annotates a field with ``flax.optim.Optimizer``, removed from Flax in 2022,
so a stand-in is set before the import). Their CIFAR-10 configs are shrunk (nf 32, ``ch_mult``
(1, 2, 2), one res block per stage, attention at 8x8, 16x16 images) and ``init_scale`` set to 1
(the published 0 zero-initialises the output convs: every comparison would be vacuous; DDPM's
last conv has its scale written in its code, so its outputs are of order 1e-5 and its errors
are read relative to them); random weights, called as ``model.apply(v, x, sigmas,
train=False)``.

    python -m benchmarks.score_sde --score-sde ~/src/score_sde --json bench_results/score_sde.json
"""

from __future__ import annotations

import argparse
import os
import sys

from benchmarks.common import checkout_args, checkout_run, setup

# name: its config module
MODELS = {
    "ncsnpp": "configs.ve.cifar10_ncsnpp_continuous",
    "ddpmpp": "configs.vp.cifar10_ddpmpp_continuous",
    "ddpm": "configs.vp.ddpm.cifar10_continuous",
}
SIZE = 16


def xla_flops(model, variables, args, compiled: bool) -> float:
    """XLA's flop count of ``model.apply(variables, *args, train=False)``, lowered or compiled."""
    import jax

    lowered = jax.jit(lambda v, *a: model.apply(v, *a, train=False)).lower(variables, *args)
    return (lowered.compile() if compiled else lowered).cost_analysis()["flops"]


def measure(model, variables, args, calibration, *, tmp_dir: str,
            exporters=("onnx", "tflite")) -> dict:
    """One model's row: ``args`` its example call's arrays (images and noise levels, the batch
    first in each), called with ``train=False``; ``calibration`` a tuple of such arrays."""
    from benchmarks.public_models import decomposition_row, exported

    row = decomposition_row(model, variables, args, [calibration],
                            lambda m, v, c: xla_flops(m, v, args, c), train=False)
    row.update(exported(row.pop("result"), tuple(args), tmp_dir=tmp_dir, exporters=exporters,
                        train=False))
    return row


def main(argv=None) -> dict:
    setup()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args, names = checkout_args(
        parser, argv, flag="--score-sde", found=os.path.join("models", "ncsnpp.py"),
        help="a checkout of github.com/yang-song/score_sde", models=MODELS,
        json="bench_results/score_sde.json")

    import importlib
    import types

    import flax
    import jax
    import jax.numpy as jnp

    from benchmarks.public_models import _table

    if not hasattr(flax, "optim"):  # an annotation of its State dataclass, nothing more
        flax.optim = types.SimpleNamespace(Optimizer=object)
    sys.path.insert(0, os.path.abspath(args.score_sde))
    from models import ddpm, ncsnpp, utils  # noqa: F401 - registers the models

    def row_of(name, tmp):
        config = importlib.import_module(MODELS[name]).get_config()
        config.model.nf, config.model.num_res_blocks = 32, 1
        config.model.ch_mult, config.model.attn_resolutions = (1, 2, 2), (SIZE // 2,)
        config.model.init_scale, config.data.image_size = 1.0, SIZE
        model = utils.get_model(config.model.name)(config=config)

        def inputs(n, seed):
            x = jax.random.normal(jax.random.key(seed), (n, SIZE, SIZE, 3))
            return x, jnp.linspace(0.5, 5.0, n)  # noise levels (a Fourier embedding's sigmas)

        example = inputs(args.batch, 0)
        variables = jax.jit(lambda x, t, m=model: m.init(
            {"params": jax.random.key(1), "dropout": jax.random.key(2)}, x, t, train=False))(
            *example)
        return measure(model, variables, example, inputs(args.calibration_images, 3),
                       tmp_dir=tmp)

    return checkout_run("score_sde", argv, ("score_sde", args.score_sde), names, row_of,
                        _table, args.json)


if __name__ == "__main__":
    main()
