"""Minimal reproduction: XLA:CPU's YNNPACK fusion makes a VGG-16 forward pass ~3x slower.

Self-contained (JAX only, no lrjax, no Flax): VGG-16 (13 3x3 convs, ReLU, 2x2 max pooling, three
dense layers) in ``jax.lax``/``jax.numpy`` with random weights, jitted, batch 4 at 224x224. The
script runs itself twice in fresh processes, with XLA's default flags and with
``--xla_cpu_experimental_ynn_fusion_type=`` (YNNPACK fusion off), and for each prints the median
forward time and what the optimised HLO holds: with the default flags one ``__ynn_fusion``
swallows the conv stack and the first two dense layers.

    python -m benchmarks.ynn_fusion_repro [--batch 4] [--fc 4096] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

WIDTHS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
FLAG_SETS = {"XLA default flags": "", "YNN fusion off": "--xla_cpu_experimental_ynn_fusion_type="}


def vgg16_forward(batch: int, fc: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    key = jax.random.key(0)
    params, c = [], 3
    for block in WIDTHS:
        for n in block:
            key, sub = jax.random.split(key)
            params.append(jax.random.normal(sub, (3, 3, c, n)) * (2.0 / (9 * c)) ** 0.5)
            c = n
    dense = []
    for fan_in, fan_out in ((7 * 7 * 512, fc), (fc, fc), (fc, 1000)):
        key, sub = jax.random.split(key)
        dense.append(jax.random.normal(sub, (fan_in, fan_out)) * (1.0 / fan_in) ** 0.5)

    def forward(params, dense, x):
        i = 0
        for block in WIDTHS:
            for _ in block:
                x = jax.lax.conv_general_dilated(x, params[i], (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
                x = jax.nn.relu(x)
                i += 1
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                      "VALID")
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(x @ dense[0])
        x = jax.nn.relu(x @ dense[1])
        return x @ dense[2]

    x = jax.random.normal(key, (batch, 224, 224, 3))
    fn = jax.jit(forward)
    hlo = fn.lower(params, dense, x).compile().as_text()
    jax.block_until_ready(fn(params, dense, x))
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, dense, x))
        runs.append(time.perf_counter() - t0)
    fusions = re.findall(r"fusion_config\":\{\"kind\":\"(__\w+)\"", hlo)
    ynn = [line for line in hlo.splitlines() if "__ynn_fusion" in line and "= " in line]
    return {"median_s": statistics.median(runs), "runs_s": runs, "jax": jax.__version__,
            "library_fusions": fusions,
            "ynn_fusion_operands": [line.count("%") - 1 for line in ynn]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--fc", type=int, default=4096, help="width of the two hidden dense layers")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(vgg16_forward(args.batch, args.fc, args.repeats)))
        return None
    results = {}
    for label, flags in FLAG_SETS.items():
        env = dict(os.environ, XLA_FLAGS=flags)
        out = subprocess.run([sys.executable, "-m", "benchmarks.ynn_fusion_repro", "--child",
                              f"--batch={args.batch}", f"--fc={args.fc}",
                              f"--repeats={args.repeats}"],
                             env=env, capture_output=True, text=True, check=True)
        results[label] = {"XLA_FLAGS": flags, **json.loads(out.stdout.strip().splitlines()[-1])}
        r = results[label]
        print(f"{label:<20} XLA_FLAGS={flags!r:<45} forward {r['median_s'] * 1e3:8.1f} ms   "
              f"library fusions: {r['library_fusions'] or 'none'}", flush=True)
    slow, fast = (results[k]["median_s"] for k in FLAG_SETS)
    print(f"default / fusion off: {slow / fast:.2f}x (batch {args.batch}, fc {args.fc}, "
          f"{os.cpu_count()} cores)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json + ".tmp", "w") as f:
            json.dump({"batch": args.batch, "fc": args.fc, "results": results,
                       "ratio": slow / fast}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return results


if __name__ == "__main__":
    main()
