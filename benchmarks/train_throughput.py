"""Training throughput (images/s) of NIN and low-rank NIN: lrjax's jit train step vs PyTorch.

Both frameworks run the same architectures (nin_cudnn.lua / lowrank_nin_cudnn.lua), the same
batch, SGD with momentum and weight decay, dropout on, on the same device, side by side in one run:
the four contenders take turns one step at a time and each reports the median of its steps.
PyTorch (a bench-only extra: ``pip install -e .[bench]``) is skipped with a note if missing.

    python -m benchmarks.train_throughput --batch 128 --steps 10 --json bench_results/train_throughput.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import ml_collections

from benchmarks.common import machine, write_json
from lrjax import models, train


def jax_train_step(name: str, batch: int):
    """A zero-argument callable running one jit train step of zoo model ``name`` to completion."""
    model = models.get_model(name)
    config = ml_collections.ConfigDict(dict(lr_values=(0.05,), lr_boundaries_epochs=(),
                                            weight_decay=1e-4, momentum=0.9))
    tx = train.make_optimizer(config, 500)
    state = jax.jit(lambda: train.create_train_state(model, tx, (32, 32, 3), 0))()
    step = jax.jit(train.train_step, donate_argnums=(0, 2))
    key = jax.random.key(0)
    batch_data = {"image": jax.random.normal(key, (batch, 32, 32, 3)),
                  "label": jax.random.randint(key, (batch,), 0, 10)}
    carry = [state, train.zero_metrics(10)]

    def run():
        carry[0], carry[1] = step(carry[0], batch_data, carry[1])
        jax.block_until_ready(carry[1])

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


def torch_train_step(lowrank: bool, batch: int):
    """A zero-argument callable running one PyTorch SGD step of (low-rank) NIN."""
    import torch

    torch.manual_seed(0)
    model = torch_nin(lowrank)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def run():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return run


def interleaved_step_times(steps: dict, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each step function, timed one step at a time, the functions taking turns.

    Taking turns spreads slow phases of a shared machine evenly over every contender, and the
    median of single steps ignores the odd step a neighbour slowed down.
    """
    for run in steps.values():
        for _ in range(warmup):  # compile + warm-up
            run()
    times = {key: [] for key in steps}
    for _ in range(rounds):
        for key, run in steps.items():
            t0 = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - t0)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10,
                        help="timed steps per contender (median reported)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    steps = {}
    for name in ("nin", "lowrank_nin"):
        steps[(name, "lrjax")] = jax_train_step(name, args.batch)
        if torch_version:
            steps[(name, "pytorch")] = torch_train_step(name == "lowrank_nin", args.batch)
    times = interleaved_step_times(steps, args.steps)
    rows = {}
    for (name, framework), runs in times.items():
        rows.setdefault(name, {})[framework] = args.batch / statistics.median(runs)
        rows[name][f"{framework}_step_s"] = [round(t, 4) for t in runs]
    print(f"\nTrain-step throughput, batch {args.batch}, {jax.default_backend()} "
          f"({os.cpu_count()} cores)")
    print(f"{'model':<14}{'lrjax img/s':>13}{'pytorch img/s':>15}{'lrjax/pytorch':>15}")
    for name, r in rows.items():
        pt = r.get("pytorch")
        ratio = r["lrjax"] / pt if pt else float("nan")
        r["lrjax_over_pytorch"] = ratio
        print(f"{name:<14}{r['lrjax']:>13.1f}{pt or float('nan'):>15.1f}{ratio:>14.2f}x")
    lr_gain = rows["lowrank_nin"]["lrjax"] / rows["nin"]["lrjax"]
    print(f"low-rank NIN vs NIN (lrjax): {lr_gain:.2f}x faster")
    if torch_version:
        print(f"low-rank NIN vs NIN (pytorch): "
              f"{rows['lowrank_nin']['pytorch'] / rows['nin']['pytorch']:.2f}x faster")
    result = {"machine": {**machine(), "torch": torch_version},
              "batch": args.batch, "steps": args.steps, "models": rows,
              "lowrank_speedup_lrjax": lr_gain}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
