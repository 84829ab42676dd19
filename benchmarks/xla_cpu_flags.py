"""Which XLA:CPU flags give each net its best time: full and low-rank VGG-16 inference and NIN
training, under candidate flag sets, each set in a fresh process.

Within a process the full and the low-rank net take turns call by call (median of ``--repeats``);
the table gives each workload's time under every flag set and marks the best. The set lrjax's
entry points use (:data:`lrjax.xla_flags.RECOMMENDED`) is chosen from this table.

    python -m benchmarks.xla_cpu_flags --json bench_results/xla_cpu_flags.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
FLAG_SETS = {
    "XLA defaults": "",
    "YNN fusion off": YNN_OFF,
    "YNN: individual dots only": "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
    "YNN: individual convolutions only":
        "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
    "YNN off + XNNPACK dot fusion": f"{YNN_OFF} --xla_cpu_experimental_xnn_fusion_type=dot",
    "YNN off + oneDNN": f"{YNN_OFF} --xla_cpu_use_onednn=true",
}
WORKLOADS = ("vgg16 forward", "nin train step")


def _child(workload: str, vgg_batch: int, nin_batch: int, repeats: int) -> dict:
    import jax

    from benchmarks import common, speed, train_throughput
    from lrjax import models

    calls = {}
    for lowrank in (False, True):
        label = "lowrank" if lowrank else "full"
        if workload == "vgg16 forward":
            model = models.get_model("vgg16", lowrank=lowrank)
            calls[label] = speed._calls(model, 224, vgg_batch, jax.numpy.float32, False)["forward"]
        else:
            calls[label] = train_throughput.jax_train_step(lowrank, nin_batch)
    times = common.interleaved_times(calls, repeats)
    return {k: common.median(v) for k, v in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vgg-batch", type=int, default=4)
    parser.add_argument("--nin-batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sets", default=None, help="comma-separated subset of the flag sets")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.vgg_batch, args.nin_batch, args.repeats)))
        return None
    from benchmarks import common

    sets = args.sets.split(",") if args.sets else list(FLAG_SETS)
    workloads = args.workloads.split(",")
    table = {}
    for label in sets:
        for workload in workloads:
            env = dict(os.environ, XLA_FLAGS=FLAG_SETS[label])
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.xla_cpu_flags", "--child", workload,
                 f"--vgg-batch={args.vgg_batch}", f"--nin-batch={args.nin_batch}",
                 f"--repeats={args.repeats}"], env=env, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{label} / {workload} failed:\n{out.stderr[-3000:]}")
            t = json.loads(out.stdout.strip().splitlines()[-1])
            table.setdefault(workload, {})[label] = {**t, "ratio": t["full"] / t["lowrank"]}
            print(f"{workload:<16} {label:<36} full {t['full'] * 1e3:8.1f} ms  lowrank "
                  f"{t['lowrank'] * 1e3:8.1f} ms  ratio {t['full'] / t['lowrank']:.2f}x",
                  flush=True)
    best = {w: {net: min(rows, key=lambda k, net=net: rows[k][net]) for net in ("full", "lowrank")}
            for w, rows in table.items()}
    for w, b in best.items():
        print(f"best for {w}: full -> {b['full']}, low-rank -> {b['lowrank']}")
    result = {"machine": common.machine(), "flag_sets": {k: FLAG_SETS[k] for k in sets},
              "vgg_batch": args.vgg_batch, "nin_batch": args.nin_batch,
              "repeats": args.repeats, "seconds": table, "best": best}
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
