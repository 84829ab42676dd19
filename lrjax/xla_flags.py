"""The XLA flags lrjax's entry points run with, and a record of the flags in effect.

Measured on the project's 2-core CPU with JAX 0.10.2 (``benchmarks/xla_cpu_flags.py``,
``benchmarks/ynn_fusion_repro.py``, BENCHMARKS.md): XLA:CPU's YNNPACK fusion pass, on by default,
pulls VGG-16's whole conv stack and classifier into one ``__ynn_fusion`` that runs ~3x slower
than the same ops left to XLA's own emitters (batch 4 forward: 1.19 s vs 0.35 s); with it off no
workload measured got slower and the NIN train step got faster. So:

* the library never changes global flags on import;
* the entry points (``python -m experiments.*``, ``benchmarks.*``, ``lrjax.convert``,
  ``lrjax.export``) call :func:`use_recommended_flags` before JAX starts its backends: it sets
  ``XLA_FLAGS`` to :data:`RECOMMENDED` **unless ``XLA_FLAGS`` is already set** (any value, even
  empty: the user's choice wins; ``XLA_FLAGS= python -m ...`` runs with XLA's defaults).

The flags are CPU-only; other backends ignore them.
"""

from __future__ import annotations

import os
import warnings

__all__ = ["RECOMMENDED", "use_recommended_flags", "flags_in_effect"]

RECOMMENDED = "--xla_cpu_experimental_ynn_fusion_type="

_SOURCE = "LRJAX_XLA_FLAGS_SOURCE"  # records who chose XLA_FLAGS, for benchmark JSON


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - layout of a future JAX
        return False
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started else bool(getattr(xla_bridge, "_backends", None))


def use_recommended_flags() -> str:
    """Set ``XLA_FLAGS`` to :data:`RECOMMENDED` unless the user set it; returns the flags in
    effect. Call it before the first JAX computation (entry points call it first thing)."""
    if "XLA_FLAGS" in os.environ:
        os.environ.setdefault(_SOURCE, "user")
        return os.environ["XLA_FLAGS"]
    if _backends_started():
        warnings.warn("JAX's backends are already running: lrjax's recommended XLA flags "
                      f"({RECOMMENDED!r}) cannot take effect in this process", stacklevel=2)
        return ""
    os.environ["XLA_FLAGS"] = RECOMMENDED
    os.environ[_SOURCE] = "lrjax default"
    return RECOMMENDED


def flags_in_effect() -> dict:
    """``{"XLA_FLAGS": ..., "source": "user" | "lrjax default" | "unset"}`` (for benchmark JSON)."""
    if "XLA_FLAGS" not in os.environ:
        return {"XLA_FLAGS": None, "source": "unset"}
    return {"XLA_FLAGS": os.environ["XLA_FLAGS"], "source": os.environ.get(_SOURCE, "user")}
