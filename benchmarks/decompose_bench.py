"""Decomposition benchmark on the 13 VGG-16 conv kernel shapes at the authors' ranks.

Compares, in one run:
  (a) time to decompose the whole net: ``vh_decompose`` (jit, after warm-up; auto route and plain
      SVD route) vs a plain NumPy SVD reference vs the iterative ALS baseline run to convergence;
  (b) each layer's relative error: closed form vs iterative at equal rank, and the closed form vs
      the exact optimum ``sqrt(sum_{k>K} s_k^2)`` from a float64 NumPy SVD.

Kernels are random (He-normal): no pretrained weights are needed, and a flat spectrum is the hard
case for truncated and iterative solvers.

    python -m benchmarks.decompose_bench --json bench_results/decompose.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import machine, setup, write_json
from lrjax import cost_report, iterative, ranks
from lrjax.decompose import (
    decompose_net,
    kernel_to_matrices,
    reconstruct,
    relative_error,
    vh_decompose,
)


def numpy_reference(kernel: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The authors' route: NumPy SVD of the (C*kh) x (kw*N) matrix, sqrt(s) split equally."""
    kh, kw, c, n = kernel.shape
    m = kernel.transpose(2, 0, 1, 3).reshape(c * kh, kw * n)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, vt[:rank].T * root


def optimum(kernel: np.ndarray, rank: int) -> float:
    s = np.linalg.svd(np.asarray(kernel_to_matrices(kernel.astype(np.float64)))[0],
                      compute_uv=False)
    return float(np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2)))


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None):
    setup()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write results to this JSON file")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--als-iters", type=int, default=500, help="ALS iteration cap")
    parser.add_argument("--als-tol", type=float, default=1e-7)
    parser.add_argument("--seeds", type=int, default=1, help="ALS seeds per layer")
    args = parser.parse_args(argv)

    layers = cost_report.zoo_conv_shapes("vgg16")
    rank_map = ranks.load_ranks("vgg16")
    rng = np.random.default_rng(0)
    kernels = {
        layer.name: (rng.standard_normal(layer.kernel_shape)
                     * np.sqrt(2.0 / np.prod(layer.kernel_shape[:3]))).astype(np.float32)
        for layer in layers
    }
    device_kernels = {k: jnp.asarray(v) for k, v in kernels.items()}

    def whole_net(method):
        fn = jax.jit(lambda ks: {name: vh_decompose(w, rank_map[name], method=method)
                                 for name, w in ks.items()})
        jax.block_until_ready(fn(device_kernels))  # compile + warm-up
        return fn

    results = {"machine": machine()}
    times = {}
    jax.block_until_ready(decompose_net(device_kernels, rank_map))  # compile + warm-up
    times["decompose_net (auto)"] = timed(lambda: decompose_net(device_kernels, rank_map),
                                          args.repeats)
    auto_fn = whole_net("auto")
    times["one jit, vh_decompose (auto)"] = timed(lambda: auto_fn(device_kernels), args.repeats)
    svd_fn = whole_net("svd")
    times["one jit, vh_decompose (svd)"] = timed(lambda: svd_fn(device_kernels), args.repeats)
    times["numpy SVD reference"] = timed(
        lambda: [numpy_reference(kernels[n], rank_map[n]) for n in kernels],
        max(1, args.repeats // 2))

    als = jax.jit(iterative.als_decompose, static_argnames=("rank", "max_iters"))
    als_out, als_time = {}, 0.0
    for name, w in device_kernels.items():
        best = None
        for seed in range(args.seeds):
            jax.block_until_ready(als(w, rank=rank_map[name], seed=seed, max_iters=args.als_iters,
                                      tol=args.als_tol))  # compile
            t0 = time.perf_counter()
            res = jax.block_until_ready(als(w, rank=rank_map[name], seed=seed,
                                            max_iters=args.als_iters, tol=args.als_tol))
            als_time += time.perf_counter() - t0
            if best is None or float(res.relative_error) < float(best.relative_error):
                best = res
        als_out[name] = best
    times["ALS baseline (to convergence)"] = [als_time]

    factors = decompose_net(device_kernels, rank_map)
    rows = []
    for layer in layers:
        name = layer.name
        f = factors[name]
        closed = float(relative_error(device_kernels[name], reconstruct(*f)))
        it = als_out[name]
        it_err = float(relative_error(device_kernels[name], reconstruct(*it.factors)))
        rows.append({"layer": name, "kernel": list(layer.kernel_shape), "rank": rank_map[name],
                     "optimum": optimum(kernels[name], rank_map[name]), "closed_form": closed,
                     "als": it_err, "als_iterations": int(it.iterations)})

    summary = {k: {"median_s": statistics.median(v), "runs": v} for k, v in times.items()}
    ref = summary["decompose_net (auto)"]["median_s"]
    print(f"\nWhole VGG-16 (13 conv kernels, authors' ranks) on {jax.default_backend()}:")
    print(f"{'method':<32}{'median s':>10}{'vs first':>10}")
    for k, v in summary.items():
        print(f"{k:<32}{v['median_s']:>10.3f}{v['median_s'] / ref:>9.1f}x")
    print(f"\n{'layer':<10}{'kernel':>20}{'rank':>6}{'optimum':>10}{'closed':>10}{'rel.gap':>10}"
          f"{'ALS':>10}{'iters':>7}")
    for r in rows:
        gap = r["closed_form"] / r["optimum"] - 1 if r["optimum"] else 0.0
        r["closed_form_rel_gap"] = gap
        print(f"{r['layer']:<10}{str(tuple(r['kernel'])):>20}{r['rank']:>6}{r['optimum']:>10.5f}"
              f"{r['closed_form']:>10.5f}{gap:>10.1e}{r['als']:>10.5f}{r['als_iterations']:>7}")
    checks = {
        "closed_form_never_above_als": all(r["closed_form"] <= r["als"] * (1 + 1e-6) for r in rows),
        "closed_form_within_1e-4_of_optimum": all(abs(r["closed_form_rel_gap"]) <= 1e-4
                                                   for r in rows),
        "auto_under_1.5s": ref < 1.5,
        "als_at_least_10x_slower": summary["ALS baseline (to convergence)"]["median_s"] >= 10 * ref,
    }
    print("\nchecks:", json.dumps(checks, indent=1))
    results.update({"times": summary, "layers": rows, "checks": checks})
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
