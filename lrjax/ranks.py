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
from lrjax.costs import max_rank
from lrjax.decompose import singular_values

__all__ = [
    "PUBLISHED",
    "load_ranks",
    "round_rank",
    "energy_rank",
    "Allocation",
    "saving_rank",
    "allocate_ranks",
    "candidate_ranks",
    "check_rank_map",
    "search_problem",
    "EvalGuided",
    "SearchResult",
    "DEFAULT_FRACTIONS",
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
    ranks = data.get("ranks", data) if isinstance(data, dict) else data
    return check_rank_map(ranks, source)


def check_rank_map(ranks, source: str = "the rank map") -> dict[str, int | None]:
    """``ranks`` as a dict, checked to map layer names (str) to integer ranks or ``None``.

    Raises:
      ValueError: naming ``source`` and the first offending entry.
    """
    if not isinstance(ranks, Mapping):
        raise ValueError(f"{source} must map layer names to integer ranks (or null for full); "
                         f"got {type(ranks).__name__}")
    for k, v in ranks.items():
        if not isinstance(k, str) or not (
                v is None or (isinstance(v, (int, np.integer)) and not isinstance(v, bool))):
            raise ValueError(f"{source} must map layer names to integer ranks (or null for "
                             f"full); got {k!r}: {v!r}")
    return {k: (None if v is None else int(v)) for k, v in ranks.items()}


def round_rank(rank: int, multiple: int, *, top: int, groups: int = 1) -> int:
    """Round ``rank`` to the nearest multiple of ``lcm(multiple, groups)`` within ``[unit, top]``.

    When ``top`` is not itself such a multiple, ``top`` is allowed (full rank is always valid).
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1; got {multiple}")
    unit = math.lcm(multiple, groups)
    r = max(unit, int(round(rank / unit)) * unit)
    return min(r, top)


def _group_energies(kernel, groups: int, spectrum=None) -> np.ndarray:
    """Energy of the k-th singular direction summed over groups, descending: ``(R,)``."""
    s = singular_values(kernel, groups=groups) if spectrum is None else spectrum
    s = np.asarray(s, dtype=np.float64)
    expected = (groups, max_rank(np.shape(kernel), groups=groups) // groups)
    if s.shape != expected:
        raise ValueError(f"spectrum must have shape {expected} (groups, R) for kernel "
                         f"{np.shape(kernel)}; got {s.shape}")
    return np.square(s).sum(axis=0)


def energy_rank(kernel, fraction: float, *, groups: int = 1, multiple: int | None = None,
                spectrum=None) -> int:
    """Smallest total rank keeping at least ``fraction`` of the kernel's spectral energy.

    Energy is ``sum_k s_k^2 / ||W||_F^2`` summed over groups (each group gets ``rank / groups``).
    With ``multiple``, the rank is rounded *up* to a multiple of ``lcm(multiple, groups)``.
    ``spectrum`` (``(groups, R)`` singular values) replaces the kernel's own, e.g. the spectrum of
    a calibration-whitened matrix.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"energy fraction must be in (0, 1]; got {fraction}")
    e = _group_energies(kernel, groups, spectrum)
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

    ranks: dict[str, int | None]  # None: kept full rank
    full_macs: int
    lowrank_macs: int
    retained_energy: dict[str, float]

    @property
    def speedup(self) -> float:
        return self.full_macs / self.lowrank_macs


def saving_rank(layer: costs.ConvShape, unit: int = 1) -> int | None:
    """The largest total rank, a multiple of ``unit``, whose pair costs strictly fewer
    multiply-adds than the full conv; ``None`` if no pair of the layer saves anything."""
    top = costs.max_rank(layer.kernel_shape, groups=layer.groups)
    full = costs.conv_cost(layer).macs
    rank = min(costs.breakeven_rank(layer), top) // unit * unit
    while rank >= unit and costs.lowrank_cost(layer, rank).macs >= full:
        rank -= unit
    return rank if rank >= unit else None


def allocate_ranks(
    layers: Sequence[costs.ConvShape],
    kernels: Mapping[str, object],
    *,
    target_speedup: float | None = None,
    macs_budget: int | None = None,
    multiple: int | Mapping[str, int | None] | None = None,
    spectra: Mapping[str, object] | None = None,
    overhead: Mapping[str, float] | None = None,
) -> Allocation:
    """Allocate ranks across layers to meet a multiply-add budget while losing the least energy.

    Zhang et al. (2015)'s greedy criterion: maximise ``prod_l E_l(K_l)``, the product over layers of
    the retained spectral energy, subject to the total multiply-adds. Every layer starts full rank
    (energy 1, the conv's cost); its first step is to its largest rank whose pair saves
    multiply-adds (:func:`saving_rank`), each later step removes one rank unit
    (``lcm(multiple, groups)``). The greedy step is taken on the layer that loses the least
    log-energy per multiply-add saved, until the budget is met; layers it never needs stay full
    (``None``): no layer is split for nothing.

    Args:
      layers: conv geometries (:class:`lrjax.costs.ConvShape`); each may be decomposed.
      kernels: HWIO kernel of each layer by name (their spectra drive the choice).
      target_speedup: whole-net theoretical speedup over ``layers`` to reach (or exceed); > 1.
      macs_budget: alternatively, the total multiply-adds allowed.
      multiple: round every rank to a multiple of this (hardware tiles); or ``{name: multiple}``.
      spectra: optional ``{name: (groups, R) singular values}`` replacing the kernels' own (e.g.
        calibration-whitened spectra).
      overhead: optional ``{name: multiply-adds}`` a layer costs beyond its product while it
        stays full and saves once split (a weight parametrization:
        :attr:`lrjax.sites.ConvSite.parametrization_flops`).

    Returns:
      An :class:`Allocation`; its ``speedup`` is the speedup reached (>= the target); its ranks
      are ``None`` for the layers kept full.

    Raises:
      ValueError: neither or both targets given, a target speedup not above 1, a kernel missing or
        of the wrong shape, or a budget that even the smallest ranks cannot meet (the message
        gives the largest reachable speedup).
    """
    if (target_speedup is None) == (macs_budget is None):
        raise ValueError("give exactly one of target_speedup or macs_budget")
    overhead = dict(overhead or {})
    full_total = sum(costs.conv_cost(layer).macs + overhead.get(layer.name, 0) for layer in layers)
    if target_speedup is not None:
        if not target_speedup > 1:
            raise ValueError(f"target_speedup must be > 1 (S times fewer multiply-adds); got "
                             f"{target_speedup}")
        macs_budget = full_total / target_speedup
    if macs_budget <= 0:
        raise ValueError(f"macs_budget must be > 0; got {macs_budget}")

    by_name = {layer.name: layer for layer in layers}
    units, first, energies = {}, {}, {}
    ranks: dict[str, int | None] = {}
    for layer in layers:
        if layer.name not in kernels:
            raise ValueError(f"no kernel given for layer {layer.name!r}")
        kernel = kernels[layer.name]
        if tuple(np.shape(kernel)) != layer.kernel_shape:
            raise ValueError(f"kernel for {layer.name!r} has shape {np.shape(kernel)}, "
                             f"expected {layer.kernel_shape}")
        units[layer.name] = math.lcm((multiple.get(layer.name) if isinstance(multiple, Mapping)
                                      else multiple) or 1, layer.groups)
        first[layer.name] = saving_rank(layer, units[layer.name])
        ranks[layer.name] = None  # full rank
        # cumulative energy as a function of total rank K: cum[K // groups]
        e = _group_energies(kernel, layer.groups, (spectra or {}).get(layer.name))
        energies[layer.name] = (np.concatenate([[0.0], np.cumsum(e)]), e.sum())

    def macs(name, rank):
        layer = by_name[name]
        if rank is None:
            return costs.conv_cost(layer).macs + overhead.get(name, 0)
        return costs.lowrank_cost(layer, rank).macs

    def log_energy(name, rank):
        if rank is None:
            return 0.0
        cum, total = energies[name]
        kept = cum[rank // by_name[name].groups] / max(total, 1e-300)
        return math.log(max(kept, 1e-300))

    def next_rank(name):
        r = ranks[name]
        if r is None:
            return first[name]
        return r - units[name] if r - units[name] >= units[name] else None

    def priority(name):
        nxt = next_rank(name)
        if nxt is None:
            return None
        loss = log_energy(name, ranks[name]) - log_energy(name, nxt)
        return loss / (macs(name, ranks[name]) - macs(name, nxt))

    current = sum(macs(n, r) for n, r in ranks.items())
    heap = [(p, n) for n in ranks if (p := priority(n)) is not None]
    heapq.heapify(heap)
    while current > macs_budget:
        if not heap:
            floor = sum(macs(n, units[n] if first[n] is not None else None) for n in ranks)
            raise ValueError(f"budget of {macs_budget:,.0f} multiply-adds is out of reach: the "
                             f"smallest ranks give {floor:,} (speedup {full_total / floor:.2f}x)")
        _, name = heapq.heappop(heap)
        before = macs(name, ranks[name])
        ranks[name] = next_rank(name)
        current += macs(name, ranks[name]) - before
        if (p := priority(name)) is not None:
            heapq.heappush(heap, (p, name))
    retained = {n: math.exp(log_energy(n, r)) for n, r in ranks.items()}
    return Allocation(dict(ranks), int(full_total), int(current), retained)


# ---------------------------------------------------------------------------------------------
# Eval-guided selection

DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.45, 0.6, 0.8)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What :func:`search` measured and chose.

    Attributes:
      ranks: ``{path: rank or None}`` meeting the multiply-add target with the least predicted
        score drop (the sum of the per-layer drops).
      baseline: the score of the undecomposed model.
      scores: ``{path: {rank: score}}``, each with only that layer decomposed.
      full_macs, macs: the cost before and after (:attr:`lrjax.rules.RankProblem.full_macs`:
        the whole net's when traced, each element-wise flop counted as half a multiply-add).
      predicted_drop: ``sum`` of the chosen layers' drops.
      problem: the :class:`lrjax.problem.RankProblem` searched (its calibration and every
        layer's SVD cached): ``decompose_linen(..., rule=result.ranks, problem=result.problem)``
        applies the chosen ranks without calibrating or factoring again.
    """

    ranks: dict[str, int | None]
    baseline: float
    scores: dict[str, dict[int, float]]
    full_macs: float
    macs: float
    predicted_drop: float
    problem: object = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def speedup(self) -> float:
        return self.full_macs / self.macs

    def table(self) -> str:
        """Per-layer sensitivity: score drop at each candidate rank, and the chosen rank."""
        w = max([5] + [len(p) for p in self.scores]) + 2
        rows = [f"baseline score {self.baseline:.4f}; chosen ranks give {self.speedup:.2f}x "
                f"lower cost, predicted drop {self.predicted_drop:.4f}",
                f"{'layer':<{w}}chosen  drop at rank"]
        for path, by_rank in self.scores.items():
            cells = "  ".join(f"{r}:{self.baseline - s:+.4f}" for r, s in sorted(by_rank.items()))
            rows.append(f"{path:<{w}}{str(self.ranks.get(path) or 'full'):>6}  {cells}")
        return "\n".join(rows)


def candidate_ranks(layer: costs.ConvShape, candidates=None, multiple: int | None = None
                    ) -> list[int]:
    """Candidate total ranks of one layer: fractions of its break-even rank (the largest rank
    whose pair costs no more than the conv), rounded to ``lcm(multiple, groups)``, or an explicit
    list."""
    unit = math.lcm(multiple or 1, layer.groups)
    top = max_rank(layer.kernel_shape, groups=layer.groups)
    if isinstance(candidates, Mapping):
        if layer.name not in candidates:
            return []
        return sorted({costs.check_rank(r, layer.kernel_shape, groups=layer.groups,
                                        where=f"layer {layer.name!r}")
                       for r in candidates[layer.name]})
    fractions = DEFAULT_FRACTIONS if candidates is None else tuple(candidates)
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"candidate fractions must be in (0, 1]; got {fractions}")
    even = costs.breakeven_rank(layer)
    return sorted({min(top, max(unit, int(round(f * even / unit)) * unit)) for f in fractions})


def _choose(options: dict[str, list[tuple[int | None, int, float]]], budget: float):
    """Multiple-choice knapsack: one option ``(rank, macs, drop)`` per layer, total macs within
    ``budget``, least total drop. Dynamic programme over the budget in 4000 steps (costs rounded
    up, so the choice never exceeds the budget)."""
    steps = 4000
    unit = budget / steps
    inf = float("inf")
    best = [0.0] + [0.0] * steps  # best[b]: least drop with total cost <= b units
    picks = []
    for name, opts in options.items():
        cost = [math.ceil(m / unit - 1e-9) for _, m, _ in opts]
        new, choice = [inf] * (steps + 1), [-1] * (steps + 1)
        for b in range(steps + 1):
            for i, (c, (_, _, drop)) in enumerate(zip(cost, opts, strict=True)):
                if c <= b and best[b - c] + drop < new[b]:
                    new[b], choice[b] = best[b - c] + drop, i
        best = new
        picks.append((name, cost, choice))
    if best[steps] == inf:
        return None
    chosen, b = {}, steps
    for name, cost, choice in reversed(picks):
        i = choice[b]
        chosen[name] = options[name][i]
        b -= cost[i]
    return chosen


def search_problem(problem, *, target_speedup: float, candidates=None) -> SearchResult:
    """Eval-guided rank selection on a :class:`lrjax.rules.RankProblem` whose ``score`` is set.

    Each candidate layer is decomposed alone at each candidate rank and the model scored
    (``problem.score``); the per-layer score drops are then combined (assumed additive) to pick
    the ranks meeting ``target_speedup`` times lower cost (:attr:`RankProblem.full_macs`: the
    whole net's flops as XLA counts them when traced) with the
    least predicted drop (an exact multiple-choice knapsack over a discretised budget). Scores
    above the baseline count as no drop, and among equal drops the least compression wins.
    """
    if problem.score is None:
        raise ValueError("eval-guided selection needs an evaluation function (eval_fn)")
    if not target_speedup > 1:
        raise ValueError(f"target_speedup must be > 1 (S times lower cost); got "
                         f"{target_speedup}")
    layers = [s.shape for s in problem.candidates]
    if isinstance(candidates, Mapping):
        unknown = sorted(set(candidates) - {layer.name for layer in layers})
        if unknown:
            raise ValueError(f"candidates name unknown layers {unknown}; the model's decomposable "
                             f"convs are {sorted(layer.name for layer in layers)}")
    baseline = float(problem.score({}))
    scores, options = {}, {}
    for layer in layers:
        full = costs.conv_cost(layer).macs
        ranks = [r for r in candidate_ranks(layer, candidates, problem.multiple_of(layer.name))
                 if costs.lowrank_cost(layer, r).macs < full]  # a pair must save something
        options[layer.name] = [(None, full, 0.0)]
        if not ranks:
            continue
        problem.factors(layer.name, ranks[-1])  # one decomposition per layer, sliced below
        scores[layer.name] = {}
        for r in ranks:
            s = float(problem.score({layer.name: r}))
            if not math.isfinite(s):
                raise ValueError(f"eval_fn returned {s} for layer {layer.name!r} at rank {r}")
            scores[layer.name][r] = s
            macs = costs.lowrank_cost(layer, r).macs
            # a score above the baseline is noise, not a gain: count it as no drop; the tiny
            # term prefers the least compression among equal drops, so the target is met, not
            # overshot
            options[layer.name].append((r, macs, max(baseline - s, 0.0)
                                        + 1e-9 * (full - macs) / full))
    budget = problem.full_macs / target_speedup - problem.fixed_macs
    chosen = _choose(options, budget) if budget > 0 else None
    if chosen is None:
        floor = problem.fixed_macs + sum(min(m for _, m, _ in o) for o in options.values())
        raise ValueError(f"target speedup {target_speedup} is out of reach with these candidate "
                         f"ranks: the smallest reach {problem.full_macs / floor:.2f}x")
    macs = problem.fixed_macs + sum(m for _, m, _ in chosen.values())
    return SearchResult({name: r for name, (r, _, _) in chosen.items()}, baseline, scores,
                        problem.full_macs, macs, sum(d for _, _, d in chosen.values()), problem)


class EvalGuided:
    """A rank rule (``rule=EvalGuided(...)``) choosing ranks by measured sensitivity.

    What AIMET's greedy spatial-SVD rank selection offers: each layer's score drop is measured
    with only that layer decomposed at each candidate rank, then per-layer ranks meeting the
    multiply-add target with the least predicted drop are chosen (:func:`search_problem`).

    Args:
      eval_fn: for :func:`lrjax.decompose_linen`, ``eval_fn(module, variables) -> float``; for
        :func:`lrjax.decompose_nnx`, ``eval_fn(model) -> float``. Higher is better (accuracy,
        agreement with the full model, negative loss).
      target_speedup: times fewer flops of the whole net (see ``speedup:S``).
      candidates: fractions of each layer's break-even rank (default
        :data:`DEFAULT_FRACTIONS`) or ``{path: [ranks]}``.

    After use, ``.result`` holds the :class:`SearchResult`.
    """

    def __init__(self, eval_fn, target_speedup: float, candidates=None):
        if not callable(eval_fn):
            raise ValueError(f"eval_fn must be callable; got {eval_fn!r}")
        self.eval_fn = eval_fn
        self.target_speedup = float(target_speedup)
        self.candidates = candidates
        self.result: SearchResult | None = None

    def select(self, problem) -> dict[str, int | None]:
        self.result = search_problem(problem, target_speedup=self.target_speedup,
                                     candidates=self.candidates)
        return self.result.ranks
