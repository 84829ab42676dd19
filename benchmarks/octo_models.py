"""octo-models/octo's generalist robot policy, as published: found layers, whole-net `speedup:2`
data-free and calibrated (seconds, the report against XLA's own flop count), and the export to
ONNX Runtime and LiteRT.

Octo's ``OctoModule`` (linen) at a small random configuration: two cameras (a 64×64 primary and
a 32×32 wrist image, each stacked with its goal image, its ``SmallStem16`` conv stem with
weight-standardized ``StdConv`` layers and GroupNorm), a block-wise masked transformer of width
64 and 2 layers over a 2-step window, and an action head:

- ``l1``: its ``L1ActionHead`` (MAP pooling, a dense projection), called as Octo's init calls
  the module, ``module.apply(variables, observations, tasks, timestep_pad_mask, train=False)``;
- ``diffusion``: its ``DiffusionActionHead``, run as ``OctoModel.sample_actions`` runs it: the
  transformer, then the head's ``predict_action``, which takes ``self.unbind()`` and applies its
  score network (an MLP-ResNet) at each of ``--diffusion-steps`` denoising steps in a
  ``jax.lax.scan``; a method of the model here (``method=``), its key an argument. XLA counts a
  loop body once, so its counts are taken with the loop unrolled (``jax.lax.scan(...,
  unroll=True)``), as lrjax counts it (every step).

Octo is imported unmodified from a checkout given by path (this machine has no network:
``git clone https://github.com/octo-models/octo`` elsewhere); ``distrax`` (which only its
discrete head samples with) is stood in for, and the JAX names it reads that JAX has removed
(``jax.random.KeyArray``, ``jax.tree_map``) are put back.

    python -m benchmarks.octo_models --octo ~/src/octo --json bench_results/octo_models.json
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import types

from benchmarks.common import checkout_args, checkout_run, setup
from benchmarks.public_models import _table, decomposition_row, exported

MODELS = ("l1", "diffusion")


def _stand_ins() -> None:
    import jax

    sys.modules.setdefault("distrax", types.ModuleType("distrax")).__dict__.setdefault(
        "Categorical", None)
    jax.random.KeyArray = getattr(jax.random, "KeyArray", jax.Array)
    jax.tree_map = getattr(jax, "tree_map", jax.tree.map)


def build(name: str, diffusion_steps: int):
    """The named Octo module (see the module docstring)."""
    from octo.model.components.action_heads import DiffusionActionHead, L1ActionHead
    from octo.model.components.tokenizers import ImageTokenizer
    from octo.model.components.vit_encoders import SmallStem16
    from octo.model.octo_module import OctoModule
    from octo.utils.spec import ModuleSpec

    stem = ModuleSpec.create(SmallStem16, features=(32, 32, 64, 64), num_features=64)
    head = ModuleSpec.create(L1ActionHead, readout_key="readout_action", use_map=True,
                             action_horizon=4, action_dim=7) if name == "l1" else \
        ModuleSpec.create(DiffusionActionHead, readout_key="readout_action", use_map=False,
                          action_horizon=4, action_dim=7, hidden_dim=128,
                          diffusion_steps=diffusion_steps)
    return OctoModule.create(
        observation_tokenizers={
            camera: ModuleSpec.create(ImageTokenizer, obs_stack_keys=[f"image_{camera}"],
                                      task_stack_keys=[f"image_{camera}"], encoder=stem)
            for camera in ("primary", "wrist")},
        task_tokenizers={}, heads={"action": head}, readouts={"action": 1},
        transformer_kwargs=dict(num_layers=2, mlp_dim=256, num_attention_heads=2,
                                dropout_rate=0.0, attention_dropout_rate=0.0,
                                add_position_embedding=False),
        token_embedding_size=64, max_horizon=4)


def inputs(batch: int, seed: int, window: int = 2) -> tuple:
    """``(observations, tasks, timestep_pad_mask)`` of random uint8 images, as Octo takes them."""
    import jax.numpy as jnp
    import numpy as np

    r = np.random.default_rng(seed)
    sizes = {"primary": 64, "wrist": 32}
    observations = {f"image_{c}": jnp.asarray(r.integers(0, 256, (batch, window, s, s, 3)),
                                              jnp.uint8) for c, s in sizes.items()}
    observations["timestep_pad_mask"] = jnp.ones((batch, window), bool)
    observations["pad_mask_dict"] = {f"image_{c}": jnp.ones((batch, window), bool) for c in sizes}
    tasks = {f"image_{c}": jnp.asarray(r.integers(0, 256, (batch, s, s, 3)), jnp.uint8)
             for c, s in sizes.items()}
    tasks["pad_mask_dict"] = {f"image_{c}": jnp.ones((batch,), bool) for c in sizes}
    return observations, tasks, jnp.ones((batch, window), bool)


def sample_actions(module, observations, tasks, timestep_pad_mask, rng):
    """What ``OctoModel.sample_actions`` runs: the transformer, then the head's sampling."""
    outputs = module.octo_transformer(observations, tasks, timestep_pad_mask, train=False)
    return module.heads["action"].predict_action(outputs, rng=rng, train=False,
                                                 embodiment_action_dim=7)


def measure(name: str, model, args, calibration, *, tmp_dir: str) -> dict:
    """One model's row: ``args`` the call's positional inputs (a key last for ``diffusion``)."""
    import jax

    from lrjax import linen_trace

    keywords = {"train": False} if name == "l1" else {"method": sample_actions}
    variables = jax.jit(lambda key: model.init(key, *args[:3], train=False))(jax.random.key(0))
    scan = jax.lax.scan

    def flops(m, v, compiled):
        jax.lax.scan = functools.partial(scan, unroll=True)  # (every step, as lrjax counts)
        try:
            lowered = jax.jit(lambda v, *a: m.apply(v, *a, **keywords)).lower(v, *args)
            return (lowered.compile() if compiled else lowered).cost_analysis()["flops"]
        finally:
            jax.lax.scan = scan

    with linen_trace.known_variables(model, variables):  # (its init cannot run the sampling)
        row = decomposition_row(model, variables, args, calibration, flops, **keywords)
    result = row.pop("result")
    if name == "l1":
        row.update(exported(result, args, tmp_dir=tmp_dir, train=False))
    else:  # the key given as the call's (a constant of the graph)
        row.update(exported(result, args[:3], tmp_dir=tmp_dir, onnx_kwargs={"fixed_batch": True},
                            method=sample_actions, rng=args[3]))
    return row


def main(argv=None) -> dict:
    setup()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--diffusion-steps", type=int, default=5)
    args, names = checkout_args(
        parser, argv, flag="--octo", found=os.path.join("octo", "model", "octo_module.py"),
        help="a checkout of github.com/octo-models/octo", models=MODELS,
        json="bench_results/octo_models.json")
    if args.diffusion_steps < 1:
        parser.error("--diffusion-steps must be at least 1")

    import jax

    _stand_ins()
    sys.path.insert(0, os.path.abspath(args.octo))

    def row_of(name, tmp):
        example = inputs(args.batch, 0)
        calibration = [inputs(args.batch, 1 + i) for i in range(
            max(1, args.calibration_images // args.batch))]
        if name == "diffusion":
            example = (*example, jax.random.key(1))
            calibration = [(*c, jax.random.key(2 + i)) for i, c in enumerate(calibration)]
        return measure(name, build(name, args.diffusion_steps), example, calibration,
                       tmp_dir=tmp)

    return checkout_run("octo_models", argv, ("octo", args.octo), names, row_of, _table,
                        args.json, diffusion_steps=args.diffusion_steps)


if __name__ == "__main__":
    main()
