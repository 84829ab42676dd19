"""Helpers shared by the benchmark scripts: setup, the facts recorded with every figure, timing."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics

from lrjax import checkpoint, xla_flags
from lrjax.timing import interleaved_times  # noqa: F401  (the benchmarks' timer)


def setup() -> None:
    """Every benchmark's first call: lrjax's recommended XLA flags unless the user set
    ``XLA_FLAGS`` (before JAX starts its backends)."""
    xla_flags.use_recommended_flags()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine(*extra_packages: str) -> dict:
    """The facts a benchmark figure needs next to it: machine, versions, flags, policy."""
    import jax

    from lrjax import formulations

    packages = ("jax", "jaxlib", "flax", "numpy", *extra_packages)
    return {
        "platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "versions": {p: _version(p) for p in packages},
        "xla_flags": xla_flags.flags_in_effect(),
        "ld_preload": os.environ.get("LD_PRELOAD"),  # e.g. tcmalloc: see BENCHMARKS.md
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),  # e.g. glibc.malloc.hugetlb=1
        "formulation_policy": formulations.get_policy(),
        "formulations_active": formulations.active(),
    }


def write_json(path: str, data) -> None:
    """Write ``data`` to ``path`` atomically (no half-written result file on failure)."""
    checkpoint.write_json(path, data)


def chosen_models(parser, value: str, known) -> list[str]:
    """The models of a comma-separated ``--models`` value, each one of ``known``; otherwise the
    command line's one ``error:`` line (exit 2)."""
    names = value.split(",")
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(known)}")
    return names


def checkout_args(parser, argv, *, flag: str, help: str, found: str, models, json: str):
    """The command line of a benchmark over models from a checkout given by path (``flag``,
    ``found``: a file or folder the checkout holds), ``--json``, ``--models`` (of ``models``),
    ``--batch`` and ``--calibration-images``, each checked: ``(args, model names)``, or the
    command line's one ``error:`` line (exit 2)."""
    parser.add_argument(flag, required=True, help=help)
    parser.add_argument("--json", default=json)
    parser.add_argument("--models", default=",".join(models),
                        help=f"comma-separated subset of {','.join(models)}")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--calibration-images", type=int, default=8)
    args = parser.parse_args(argv)
    names = chosen_models(parser, args.models, models)
    checkout = getattr(args, flag.lstrip("-").replace("-", "_"))
    if not os.path.exists(os.path.join(checkout, found)):
        parser.error(f"{flag} {checkout}: no {found} there")
    if args.batch < 1 or args.calibration_images < 1:
        parser.error("--batch and --calibration-images must be at least 1")
    return args, names


def median(values) -> float:
    return statistics.median(values)


def checkout_run(module: str, argv, checkout: tuple[str, str], names, row_of, table, json: str,
                 **extra) -> dict:
    """A benchmark over models from a checkout: ``row_of(name, tmp_dir)`` for each of ``names``
    (a fresh temporary folder each), each row printed as it comes (the last line of
    ``table({name: row})``), the whole table after; written to ``json`` with the machine, the
    command (``python -m benchmarks.{module} ...``), the checkout (``(key, path)``) and
    ``extra``, and returned."""
    import sys
    import tempfile

    key, path = checkout
    result = {"machine": machine("onnxruntime", "tensorflow_cpu", "ai-edge-litert"),
              "command": f"python -m benchmarks.{module} " + " ".join(argv or sys.argv[1:]),
              key: os.path.abspath(path), **extra, "models": {}}
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            result["models"][name] = row_of(name, tmp)
        print(table({name: result["models"][name]}).splitlines()[-1], flush=True)
    print(table(result["models"]))
    write_json(json, result)
    return result

