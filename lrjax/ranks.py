"""Rank selection: the authors' per-layer maps, spectral-energy ranks, and budgeted allocation."""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
from collections.abc import Mapping, Sequence
from importlib import resources

import numpy as np

from lrjax import costs
from lrjax.decompose import max_rank, singular_values

__all__ = [
    "PUBLISHED",
    "load_ranks",
    "round_rank",
    "energy_rank",
    "Allocation",
    "allocate_ranks",
]

PUBLISHED = ("vgg16", "caffenet", "nin", "cnn")


def load_ranks(name_or_path: str) -> dict[str, int]:
    """Per-layer ranks: a shipped config (``"vgg16"``, ``"caffenet"``, ``"nin"``) or a JSON file.

    A JSON file holds either ``{"layer": rank, ...}`` or ``{"ranks": {"layer": rank, ...}}``.
    """
    if name_or_path in PUBLISHED:
        text = resources.files("lrjax").joinpath(f"rank_configs/{name_or_path}.json").read_text()
        source = f"shipped config {name_or_path!r}"
    else:
        try:
            with open(name_or_path) as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"cannot read rank file {name_or_path!r} ({e.strerror}); "
                             f"shipped configs: {', '.join(PUBLISHED)}") from None
        source = f"rank file {name_or_path!r}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source} is not valid JSON: {e}") from None
    ranks = data.get("ranks", data) if isinstance(data, dict) else None
    if not isinstance(ranks, dict) or not all(
        isinstance(k, str) and (v is None or (isinstance(v, int) and not isinstance(v, bool)))
        for k, v in ranks.items()
    ):
        raise ValueError(f"{source} must map layer names to integer ranks (or null for full)")
    return dict(ranks)


def round_rank(rank: int, multiple: int, *, top: int, groups: int = 1) -> int:
    """Round ``rank`` to the nearest multiple of ``lcm(multiple, groups)`` within ``[unit, top]``.

    When ``top`` is not itself such a multiple, ``top`` is allowed (full rank is always valid).
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1; got {multiple}")
    unit = math.lcm(multiple, groups)
    r = max(unit, int(round(rank / unit)) * unit)
    return min(r, top)


def _group_energies(kernel, groups: int) -> np.ndarray:
    """Energy of the k-th singular direction summed over groups, descending: ``(R,)``."""
    s = np.asarray(singular_values(kernel, groups=groups), dtype=np.float64)
    return np.square(s).sum(axis=0)


def energy_rank(kernel, fraction: float, *, groups: int = 1, multiple: int | None = None) -> int:
    """Smallest total rank keeping at least ``fraction`` of the kernel's spectral energy.

    Energy is ``sum_k s_k^2 / ||W||_F^2`` summed over groups (each group gets ``rank / groups``).
    With ``multiple``, the rank is rounded *up* to a multiple of ``lcm(multiple, groups)``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"energy fraction must be in (0, 1]; got {fraction}")
    e = _group_energies(kernel, groups)
    kept = np.cumsum(e) / max(e.sum(), np.finfo(np.float64).tiny)
    k = int(np.searchsorted(kept, fraction - 1e-12) + 1)
    k = min(k, e.size)
    top = max_rank(np.shape(kernel), groups=groups)
    rank = k * groups
    if multiple:
        unit = math.lcm(multiple, groups)
        rank = min(-(-rank // unit) * unit, top)
    return rank


@dataclasses.dataclass(frozen=True)
class Allocation:
    """Ranks chosen by :func:`allocate_ranks` and what they reach."""

    ranks: dict[str, int]
    full_macs: int
    lowrank_macs: int
    retained_energy: dict[str, float]

    @property
    def speedup(self) -> float:
        return self.full_macs / self.lowrank_macs


def allocate_ranks(
    layers: Sequence[costs.ConvShape],
    kernels: Mapping[str, object],
    *,
    target_speedup: float | None = None,
    macs_budget: int | None = None,
    multiple: int | None = None,
) -> Allocation:
    """Allocate ranks across layers to meet a multiply-add budget while losing the least energy.

    Zhang et al. (2015)'s greedy criterion: maximise ``prod_l E_l(K_l)``, the product over layers of
    the retained spectral energy, subject to the total multiply-adds of the pairs. Each layer starts
    at its break-even rank (the largest rank whose pair is no costlier than the conv); the greedy
    step removes one rank unit (``lcm(multiple, groups)``) from the layer that loses the least
    log-energy per multiply-add saved, until the budget is met.

    Args:
      layers: conv geometries (:class:`lrjax.costs.ConvShape`); all are decomposed.
      kernels: HWIO kernel of each layer by name (their spectra drive the choice).
      target_speedup: whole-net theoretical speedup over ``layers`` to reach (or exceed).
      macs_budget: alternatively, the total multiply-adds allowed.
      multiple: round every rank to a multiple of this (hardware tiles).

    Returns:
      An :class:`Allocation`; its ``speedup`` is the speedup reached (>= the target).

    Raises:
      ValueError: neither or both targets given, a kernel missing or of the wrong shape, or a budget
        that even the smallest ranks cannot meet (the message gives the largest reachable speedup).
    """
    if (target_speedup is None) == (macs_budget is None):
        raise ValueError("give exactly one of target_speedup or macs_budget")
    full_total = sum(costs.conv_cost(layer).macs for layer in layers)
    if target_speedup is not None:
        if target_speedup <= 0:
            raise ValueError(f"target_speedup must be > 0; got {target_speedup}")
        macs_budget = full_total / target_speedup
    if macs_budget <= 0:
        raise ValueError(f"macs_budget must be > 0; got {macs_budget}")

    units, ranks, energies, slopes = {}, {}, {}, {}
    for layer in layers:
        if layer.name not in kernels:
            raise ValueError(f"no kernel given for layer {layer.name!r}")
        kernel = kernels[layer.name]
        if tuple(np.shape(kernel)) != layer.kernel_shape:
            raise ValueError(f"kernel for {layer.name!r} has shape {np.shape(kernel)}, "
                             f"expected {layer.kernel_shape}")
        unit = math.lcm(multiple or 1, layer.groups)
        top = max_rank(layer.kernel_shape, groups=layer.groups)
        start = max(unit, costs.breakeven_rank(layer) // unit * unit)
        units[layer.name] = unit
        ranks[layer.name] = min(start, top)
        # cumulative energy as a function of total rank K: cum[K // groups]
        e = _group_energies(kernel, layer.groups)
        energies[layer.name] = (np.concatenate([[0.0], np.cumsum(e)]), e.sum())
        slopes[layer.name] = costs.rank_cost_slope(layer)

    def macs(name, rank):
        return costs.lowrank_cost(by_name[name], rank).macs

    by_name = {layer.name: layer for layer in layers}

    def log_energy(name, rank):
        cum, total = energies[name]
        kept = cum[rank // by_name[name].groups] / max(total, 1e-300)
        return math.log(max(kept, 1e-300))

    def priority(name):
        r, u = ranks[name], units[name]
        if r - u < u:
            return None
        loss = log_energy(name, r) - log_energy(name, r - u)
        return loss / (slopes[name] * u)

    current = sum(macs(n, r) for n, r in ranks.items())
    heap = [(p, n) for n in ranks if (p := priority(n)) is not None]
    heapq.heapify(heap)
    while current > macs_budget:
        if not heap:
            floor = sum(macs(n, units[n]) for n in ranks)
            raise ValueError(f"budget of {macs_budget:,.0f} multiply-adds is out of reach: the "
                             f"smallest ranks give {floor:,} (speedup {full_total / floor:.2f}x)")
        _, name = heapq.heappop(heap)
        before = macs(name, ranks[name])
        ranks[name] -= units[name]
        current += macs(name, ranks[name]) - before
        if (p := priority(name)) is not None:
            heapq.heappush(heap, (p, name))
    retained = {n: math.exp(log_energy(n, r)) for n, r in ranks.items()}
    return Allocation(dict(ranks), int(full_total), int(current), retained)
