"""Helpers shared by the benchmark scripts."""

import json
import os
import platform

import jax


def machine() -> dict:
    """The facts a benchmark figure needs next to it."""
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "jax": jax.__version__}


def write_json(path: str, data) -> None:
    """Write ``data`` to ``path`` atomically (no half-written result file on failure)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
