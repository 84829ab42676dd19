"""What a surgery did and returns, framework-neutral: :class:`SurgeryReport` (per-layer ranks,
errors, costs, the layers kept full or left as they are) and :class:`Decomposition`, the one
result type of :func:`lrjax.decompose_linen` and :func:`lrjax.decompose_nnx`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lrjax import costs, decompose, moments
from lrjax.rules import RankProblem
from lrjax.sites import KINDS

__all__ = ["SurgeryReport", "build_report", "Decomposition"]


@dataclasses.dataclass(frozen=True)
class SurgeryReport:
    """What a surgery did, layer by layer.

    Attributes:
      net: costs of every conv and dense layer found, full vs after
        (:class:`lrjax.costs.NetCost`; ``kernel_shape`` is each layer's own kernel variable's).
      errors: relative kernel error ``||W - W_K|| / ||W||`` of each decomposed layer.
      weighted_errors: the calibration-weighted error (the output-error proxy, measured on the
        calibration data) of each decomposed layer, when calibrated.
      skipped: ``{path: reason}`` of the convs left as they were because they cannot be split.
      calibrated: whether the factors are calibration-aware.
      kept_full: ``{path: why}`` of the layers that could be split but the rule kept full.
      notes: how the surgery ran (e.g. on an eval view of an NNX model).
      net_macs: ``(before, after)`` multiply-adds of the whole forward pass per example (every
        conv and matrix product traced), or ``None`` where not traced. ``net`` covers the layers
        found only; :attr:`speedup` is the whole net's when known.
      net_elementwise: XLA's flops per example of the forward pass's element-wise work (norms,
        activations, pooling, biases; unchanged by the surgery), 0 when unknown.
      kinds: ``{path: kind}`` of the layers in ``net`` (:data:`lrjax.sites.KINDS`).
    """

    net: costs.NetCost
    errors: dict[str, float]
    weighted_errors: dict[str, float] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    calibrated: bool = False
    kept_full: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()
    net_macs: tuple[int, int] | None = None
    kinds: dict[str, str] = dataclasses.field(default_factory=dict)
    net_elementwise: float = 0

    @property
    def net_flops(self) -> tuple[int, int] | None:
        """``(before, after)`` flops per example of the whole forward pass as XLA counts them
        (``cost_analysis()["flops"]``: two per multiply-add, plus the element-wise work), or
        ``None`` where not traced."""
        if self.net_macs is None:
            return None
        return tuple(2 * m + self.net_elementwise for m in self.net_macs)

    @property
    def speedup(self) -> float:
        """Theoretical speedup: the whole forward pass's flops before over after, as XLA counts
        them (:attr:`net_flops`; what ``speedup:S`` targets), or the layers' multiply-adds when
        the whole net was not traced. Fewer multiply-adds alone: :attr:`macs_speedup`."""
        if self.net_macs is None:
            return self.net.speedup
        before, after = self.net_flops
        return before / after if after else 1.0

    @property
    def macs_speedup(self) -> float:
        """The whole net's multiply-adds before over after (at least :attr:`speedup`: the
        element-wise work is a fixed cost), or the layers' when the net was not traced."""
        if self.net_macs is None:
            return self.net.speedup
        before, after = self.net_macs
        return before / after if after else 1.0

    def by_kind(self) -> dict[str, tuple[int, int]]:
        """``{kind: (macs before, macs after)}`` per example: each kind of layer found
        (:data:`lrjax.sites.KINDS`), and ``"fixed"``: the rest of the traced forward pass
        (attention's products, skipped layers), unchanged. Without a traced count, the layers
        found only."""
        out = {}
        for lc in self.net.layers:
            kind = self.kinds.get(lc.name, "kxk")
            before, after = out.get(kind, (0, 0))
            out[kind] = (before + lc.full.macs, after + lc.lowrank.macs)
        if self.net_macs is not None:
            fixed = self.net_macs[0] - self.net.full_macs
            out["fixed"] = (fixed, fixed)
        return out

    @property
    def ranks(self) -> dict[str, int]:
        return {lc.name: lc.rank for lc in self.net.layers if lc.rank is not None}

    def table(self) -> str:
        w = max([7] + [len(lc.name) for lc in self.net.layers]) + 2
        extra = "w.err" if self.calibrated else ""
        head = (f"{'layer':<{w}}{'kernel':>20}{'rank':>6}{'rel.err':>9}{extra:>9}"
                f"{'MACs before':>15}{'MACs after':>15}{'params before':>15}{'params after':>14}"
                f"{'speedup':>9}")
        rows = [head, "-" * len(head)]
        for lc in self.net.layers:
            err, werr = self.errors.get(lc.name), self.weighted_errors.get(lc.name)
            werr = ("-" if werr is None else f"{werr:.4f}") if self.calibrated else ""
            rows.append(
                f"{lc.name or '(model)':<{w}}{str(lc.kernel_shape):>20}{lc.rank or 'full':>6}"
                f"{'-' if err is None else f'{err:.4f}':>9}{werr:>9}{_count(lc.full.macs):>15}"
                f"{_count(lc.lowrank.macs):>15}{lc.full.params:>15,}{lc.lowrank.params:>14,}"
                f"{lc.speedup:>8.2f}x")
        rows.append(f"{'total':<{w + 35 + (9 if self.calibrated else 0)}}"
                    f"{_count(self.net.full_macs):>15}{_count(self.net.lowrank_macs):>15}"
                    f"{self.net.full_params:>15,}{self.net.lowrank_params:>14,}"
                    f"{self.net.speedup:>8.2f}x")
        if self.net_macs is not None:
            before, after = self.net_macs
            parts = [f"{KINDS.get(k, 'everything else (fixed)')} {_count(b)} -> {_count(a)}"
                     for k, (b, a) in self.by_kind().items()]
            rows.append(f"whole net: {_count(before)} -> {_count(after)} multiply-adds per example "
                        f"({self.macs_speedup:.2f}x): " + "; ".join(parts))
            flops_before, flops_after = self.net_flops
            rows.append(f"whole net, XLA's flop count (2 per multiply-add and "
                        f"{_count(self.net_elementwise)} element-wise): {_count(flops_before)} -> "
                        f"{_count(flops_after)} ({self.speedup:.2f}x)")
        rows += [f"kept full: {path}: {why}" for path, why in self.kept_full.items()]
        rows += [f"left as is: {path}: {reason}" for path, reason in self.skipped.items()]
        rows += [f"note: {note}" for note in self.notes]
        return "\n".join(rows)

    def as_dict(self) -> dict:
        return {
            "layers": [{"name": lc.name, "kind": self.kinds.get(lc.name),
                        "kernel": list(lc.kernel_shape), "rank": lc.rank,
                        "relative_error": self.errors.get(lc.name),
                        "weighted_error": self.weighted_errors.get(lc.name),
                        "macs_before": lc.full.macs, "macs_after": lc.lowrank.macs,
                        "params_before": lc.full.params, "params_after": lc.lowrank.params,
                        "speedup": lc.speedup} for lc in self.net.layers],
            "skipped": dict(self.skipped),
            "kept_full": dict(self.kept_full),
            "notes": list(self.notes),
            "calibrated": self.calibrated,
            "macs_before": self.net.full_macs, "macs_after": self.net.lowrank_macs,
            "layers_speedup": self.net.speedup,
            "macs_by_kind": {k: {"before": b, "after": a} for k, (b, a) in self.by_kind().items()},
            "net_macs_before": None if self.net_macs is None else self.net_macs[0],
            "net_macs_after": None if self.net_macs is None else self.net_macs[1],
            "net_elementwise_flops": self.net_elementwise,
            "net_flops_before": (self.net_flops or (None, None))[0],
            "net_flops_after": (self.net_flops or (None, None))[1],
            "macs_speedup": self.macs_speedup,
            "theoretical_speedup": self.speedup,
        }


def _count(value) -> str:
    """A per-example count with thousands separators: whole when it is whole (a float sum of
    whole counts), to one decimal otherwise (a layer run on fewer rows than the examples)."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.1f}"


def build_report(problem: RankProblem, ranks: Mapping[str, int | None],
                 factors: Mapping[str, decompose.Factors], kept_full: Mapping[str, str] = (),
                 notes: Sequence[str] = ()) -> SurgeryReport:
    """The report of a surgery (shared by the linen and NNX routes)."""
    chosen = {p: r for p, r in ranks.items() if r is not None}
    sites = problem.sites
    shapes = [s.shape for s in sites if s.shape is not None]
    existing = {s.path: s.rank for s in sites if s.rank is not None}
    net = costs.net_cost(shapes, {**existing, **chosen})
    by_path = {s.path: s for s in sites}
    net = costs.NetCost(tuple(dataclasses.replace(  # each layer's own kernel layout
        lc, kernel_shape=by_path[lc.name].kernel_variable_shape) for lc in net.layers))
    errors, weighted = {}, {}
    for path, rank in chosen.items():
        cov = None if problem.covariances is None else problem.covariances.get(path)
        groups = problem.site(path).shape.groups
        spectrum = problem.spectrum(path, compute=False) if cov is not None else None
        closed_form = spectrum is not None and groups == 1
        errors[path], weighted_error = decompose.factor_errors(
            problem.kernels[path], factors[path], groups=groups,
            input_cov=None if closed_form else cov)
        if closed_form:
            weighted_error = _weighted_from_spectrum(problem.kernels[path], errors[path],
                                                     spectrum, cov, rank)
        if weighted_error is not None:
            weighted[path] = weighted_error
    skipped = {s.path: s.skip for s in sites if s.skip is not None}
    whole = None
    if problem.net_macs is not None:
        saved = net.full_macs - net.lowrank_macs - sum(
            costs.conv_cost(s.shape).macs - costs.lowrank_cost(s.shape, s.rank).macs
            for s in sites if s.rank is not None) + sum(  # pairs already there are in net_macs
            by_path[path].parametrization_flops / 2 for path in chosen) + sum(  # plain weights
            (costs.conv_cost(by_path[p].shape).params  # fewer parameters cast to bfloat16
             - costs.lowrank_cost(by_path[p].shape, r).params) * by_path[p].param_cast_flops / 2
            for p, r in chosen.items())
        whole = (problem.net_macs, problem.net_macs - saved)
    return SurgeryReport(net, errors, weighted, skipped, problem.covariances is not None,
                         dict(kept_full), (*problem.notes, *notes), whole,
                         {s.path: s.kind for s in sites if s.shape is not None},
                         problem.net_elementwise)


def _weighted_from_spectrum(kernel, kernel_error: float, spectrum, cov, rank: int) -> float:
    """The calibration-weighted error (:func:`lrjax.decompose.weighted_relative_error`) of a
    one-group layer's closed-form factors at ``rank``, read off its whitened spectrum instead of
    multiplying the residual by the ``m x m`` covariance ``S`` (``O(m^2 n)``: 11 s for a VGG
    classifier conv on 2 cores). With ``R^T R = S + r I`` (the whitening's ridge ``r``), the
    closed form leaves ``||R D||^2 = sum_{i>K} s_i^2`` of the residual ``D``, and
    ``tr(D^T S D) = ||R D||^2 - r ||D||^2`` (``||D||`` from the kernel error); the same for
    ``W``."""
    ridge = float(moments.ridge(np.asarray(cov, np.float64).reshape(np.shape(cov)[-2:])))
    energy = np.square(np.asarray(spectrum, np.float64)[0])
    kernel_sq = float(np.sum(np.square(np.asarray(kernel, np.float64))))
    residual = energy[rank:].sum() - ridge * kernel_error ** 2 * kernel_sq
    total = energy.sum() - ridge * kernel_sq
    return float(np.sqrt(max(residual, 0.0) / total)) if total > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class Decomposition:
    """The result of :func:`lrjax.decompose_linen` and :func:`lrjax.decompose_nnx`.

    Attributes:
      module: the low-rank model. Linen: a :class:`lrjax.layers.LowRankModel`, run as
        ``module.apply(variables, *args, **kwargs)`` with what ``model.apply`` took. NNX: a copy
        of the model with the chosen convs replaced by :class:`lrjax.nnx_surgery.LowRankConvNNX`
        pairs (the original is untouched), called like the model.
      variables: linen: the low-rank model's variables (the original ones, with each decomposed
        conv's ``kernel``/``bias`` replaced by ``vertical/kernel``, ``horizontal/kernel`` and
        ``horizontal/bias``). NNX: ``None`` (the model carries its state).
      report: per-layer ranks, errors, multiply-adds and parameters (:class:`SurgeryReport`).
      problem: the :class:`RankProblem` the rule saw (spectra and factors cached), to compare
        other rules on the same model without decomposing it again.
    """

    module: Any
    variables: dict | None
    report: SurgeryReport
    problem: RankProblem = dataclasses.field(repr=False, compare=False, default=None)

    @property
    def ranks(self) -> dict[str, int]:
        """``{path: rank}`` of the layers this surgery decomposed."""
        return {p: r for p, r in self.report.ranks.items() if p in self.report.errors}
