"""Training throughput (images/s) of NIN and low-rank NIN: lrjax's jit train step vs PyTorch.

Both frameworks run the same architectures (nin_cudnn.lua / lowrank_nin_cudnn.lua), the same
batch, SGD with momentum and weight decay, dropout on, on the same device, side by side in one run:
the contenders take turns one step at a time and each reports the median of its steps. PyTorch
runs in both memory formats (NCHW and channels_last); the faster is its reference figure.
PyTorch (in requirements.txt on x86_64) is skipped with a note if missing.

``--ablate`` adds lrjax variants with one of :mod:`lrjax.formulations`' CPU formulations swapped
for the plain XLA op (and the whole ``"portable"`` policy): what each formulation is worth.

    python -m benchmarks.train_throughput --batch 128 --steps 10 --json bench_results/train_throughput.json
    python -m benchmarks.train_throughput --batch 128 --steps 8 --ablate --json bench_results/ablation.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
from unittest import mock

from benchmarks import common
from lrjax import timing

# Each CPU formulation, and how the ablation swaps it for the XLA op it replaces.
ABLATIONS = ("1x1 convs as matmuls", "pairs as matmuls when differentiated",
             "channel_matmul gradient", "max_pool slice gradient")


@contextlib.contextmanager
def without(formulation: str | None):
    """Trace code with one CPU formulation replaced by the plain XLA op (for the ablation)."""
    import flax.linen as nn
    import jax

    from lrjax import formulations as F

    def lax_conv(lhs, rhs, window_strides, padding, **kwargs):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)

    def plain_pool(x, window_shape, strides=None, padding="VALID"):
        return nn.max_pool(x, tuple(window_shape), strides and tuple(strides), padding)

    patches = {
        None: [],
        "1x1 convs as matmuls": [mock.patch.object(F, "_pointwise", lax_conv)],
        "pairs as matmuls when differentiated": [mock.patch.object(F, "_pair_half", lax_conv)],
        "channel_matmul gradient": [mock.patch.object(F, "channel_matmul", F._einsum_matmul)],
        "max_pool slice gradient": [mock.patch("lrjax.models.max_pool", plain_pool)],
    }[formulation]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def jax_train_step(lowrank: bool, batch: int, *, policy: str = "auto",
                   ablate: str | None = None, family: str = "nin", dtype: str = "float32"):
    """A zero-argument callable running one jit train step of a (low-rank) zoo model (NIN by
    default) to completion.

    The step is traced and compiled here, under the ablation (tracing happens at the first call);
    every call runs under ``policy`` (part of jit's cache key).
    """
    import jax
    import jax.numpy as jnp
    import ml_collections

    from lrjax import formulations, models, train

    spec = models.model_spec(family)
    size = spec.image_size
    model = models.get_model(family, lowrank=lowrank, dtype=jnp.dtype(dtype))
    config = ml_collections.ConfigDict(dict(lr_values=(0.05,), lr_boundaries_epochs=(),
                                            weight_decay=1e-4, momentum=0.9))
    tx = train.make_optimizer(config, 500)
    state = jax.jit(lambda: train.create_train_state(model, tx, (size, size, 3), 0))()
    step = jax.jit(train.train_step, donate_argnums=(0, 2))
    key = jax.random.key(0)
    batch_data = {"image": jax.random.normal(key, (batch, size, size, 3)),
                  "label": jax.random.randint(key, (batch,), 0, spec.num_classes)}
    carry = [state, train.zero_metrics(spec.num_classes)]

    def run():  # the policy is part of jit's cache key: every call runs under it
        with formulations.policy(policy):
            carry[0], carry[1] = step(carry[0], batch_data, carry[1])
            jax.block_until_ready(carry[1])

    with without(ablate):
        run()  # trace and compile under the ablation; later calls hit the cache
    run.carry = carry  # (state, metric sums) after the steps run so far
    return run


def torch_nin(lowrank: bool):
    import torch.nn as tnn

    def conv(cin, cout, k, pad, rank=None):
        if rank is None:
            return [tnn.Conv2d(cin, cout, k, padding=pad)]
        return [tnn.Conv2d(cin, rank, (k, 1), padding=(pad, 0), bias=False),
                tnn.Conv2d(rank, cout, (1, k), padding=(0, pad))]

    relu = tnn.ReLU
    layers = [*conv(3, 192, 5, 2, 10 if lowrank else None), relu(),
              tnn.Conv2d(192, 160, 1), relu(), tnn.Conv2d(160, 96, 1), relu(),
              tnn.ZeroPad2d((1, 0, 1, 0)), tnn.MaxPool2d(3, 2), tnn.Dropout(0.5),
              *conv(96, 192, 5, 2, 51 if lowrank else None), relu(),
              tnn.Conv2d(192, 192, 1), relu(), tnn.Conv2d(192, 192, 1), relu(),
              tnn.ZeroPad2d((1, 0, 1, 0)), tnn.AvgPool2d(3, 2), tnn.Dropout(0.5),
              tnn.Conv2d(192, 192, 3, padding=1), relu(), tnn.Conv2d(192, 192, 1), relu(),
              tnn.Conv2d(192, 10, 1), tnn.AdaptiveAvgPool2d(1), tnn.Flatten()]
    return tnn.Sequential(*layers)


def torch_train_step(lowrank: bool, batch: int, channels_last: bool = False):
    """A zero-argument callable running one PyTorch SGD step of (low-rank) NIN."""
    import torch

    torch.manual_seed(0)
    model = torch_nin(lowrank)
    x = torch.randn(batch, 3, 32, 32)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    y = torch.randint(0, 10, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def run():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return run


def main(argv=None):
    common.setup()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10,
                        help="timed steps per contender (median reported)")
    parser.add_argument("--ablate", action="store_true",
                        help="add lrjax variants without each CPU formulation, and 'portable'")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import jax

    torch_version = None
    if not args.no_torch:
        try:
            import torch
            torch_version = torch.__version__
        except ImportError:
            print("PyTorch is not installed: lrjax only")
    steps = {}
    for lowrank in (False, True):
        name = "lowrank_nin" if lowrank else "nin"
        steps[(name, "lrjax")] = jax_train_step(lowrank, args.batch)
        if args.ablate:
            steps[(name, "lrjax portable")] = jax_train_step(lowrank, args.batch,
                                                             policy="portable")
            for formulation in ABLATIONS:
                steps[(name, f"lrjax without {formulation}")] = jax_train_step(
                    lowrank, args.batch, ablate=formulation)
        if torch_version:
            steps[(name, "pytorch NCHW")] = torch_train_step(lowrank, args.batch)
            steps[(name, "pytorch channels_last")] = torch_train_step(lowrank, args.batch, True)
    # one step per turn, after lrjax.timing's pause (another runtime's spinning threads go idle)
    times = common.interleaved_times(steps, args.steps, settle_s=timing.SETTLE_S)
    rows = {}
    for (name, variant), runs in times.items():
        rows.setdefault(name, {})[variant] = {"images_per_s": args.batch / common.median(runs),
                                             "step_s": [round(t, 4) for t in runs]}
    for r in rows.values():
        torch_rows = [v["images_per_s"] for k, v in r.items() if k.startswith("pytorch")]
        r["pytorch_best"] = max(torch_rows) if torch_rows else None
        r["lrjax_over_pytorch"] = (r["lrjax"]["images_per_s"] / r["pytorch_best"]
                                   if torch_rows else None)
    print(f"\nTrain-step throughput, batch {args.batch}, {jax.default_backend()} "
          f"({os.cpu_count()} cores)")
    print(f"{'model':<14}{'variant':<46}{'img/s':>9}")
    for name, r in rows.items():
        for variant, v in r.items():
            if isinstance(v, dict):
                print(f"{name:<14}{variant:<46}{v['images_per_s']:>9.1f}")
    lr_gain = rows["lowrank_nin"]["lrjax"]["images_per_s"] / rows["nin"]["lrjax"]["images_per_s"]
    print(f"low-rank NIN vs NIN (lrjax): {lr_gain:.2f}x")
    if torch_version:
        for name, r in rows.items():
            print(f"{name}: lrjax / best PyTorch = {r['lrjax_over_pytorch']:.2f}x")
        print(f"low-rank NIN vs NIN (PyTorch, best format each): "
              f"{rows['lowrank_nin']['pytorch_best'] / rows['nin']['pytorch_best']:.2f}x")
    result = {"machine": {**common.machine("torch"), "torch_threads":
                          torch.get_num_threads() if torch_version else None},
              "batch": args.batch, "steps": args.steps, "settle_s": timing.SETTLE_S,
              "models": rows,
              "lowrank_speedup_lrjax": lr_gain}
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
