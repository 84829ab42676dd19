"""The rank problem a rule solves (:class:`RankProblem`): a model's linear layers, their kernels,
optional calibration statistics and the whole net's cost, with every layer's spectrum and
factors computed once and cached, and reusable by a later decomposition of the same model and
weights (:meth:`RankProblem.reusing`: a sweep of rules calibrates and decomposes once).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import numpy as np

from lrjax import costs, decompose
from lrjax.sites import ConvSite

__all__ = ["RankProblem", "SPECTRUM_FIRST", "variable_leaves"]

SPECTRUM_FIRST = 2048  # on CPU, a layer's matrix side this large: spectrum first (prepare)


def variable_leaves(tree) -> tuple:
    """``(path, array)`` of every leaf of a variable tree (a linen variable dict, an NNX
    ``State``), by reference: what a :class:`RankProblem` was made from."""
    return tuple((jax.tree_util.keystr(path), leaf)
                 for path, leaf in jax.tree_util.tree_leaves_with_path(tree))



@dataclasses.dataclass
class RankProblem:
    """What a rank rule sees: the model's linear layers, their kernels, optional calibration
    statistics, and (for eval-guided rules) a way to score the model with a given rank map.

    Attributes:
      sites: every conv and dense layer of the model (:class:`ConvSite`); rules choose among
        ``candidates``.
      kernels: ``{path: HWIO kernel}`` of the candidates (NumPy float32).
      covariances: ``{path: input_cov}`` when calibrated, else ``None``.
      multiple: round ranks to multiples of this (hardware tiles), or ``None``.
      score: ``score(ranks) -> float`` evaluates the model decomposed with ``ranks`` (only given
        where the caller has an evaluation function), else ``None``.
      net_macs: multiply-adds of the whole forward pass per example (every conv and matrix
        product traced, :func:`lrjax.macs.traced_macs`), or ``None``: then only the sites
        are counted. With it, ``speedup:S`` and eval-guided targets mean S times fewer flops of
        the whole net as XLA counts them (two per multiply-add, plus ``net_elementwise``), and
        whatever no rule can change (skipped layers, attention's products, the element-wise
        work) is fixed cost.
      net_elementwise: XLA's flops per example of the forward pass's element-wise work (norms,
        activations, pooling, biases), which no rank changes; 0 when unknown.
      net_constant: multiply-adds per example (of ``net_macs``) in products of the data with
        constants: a fixed filter, or weights the model holds outside its variables (layers kept
        in a closure, which Flax does not see); 0 when unknown.
      source: ``(path, array)`` of every variable the problem was made from (references, no
        copies: :func:`variable_leaves`), checked by :meth:`reusing`.

    Costs (:attr:`full_macs`, :attr:`fixed_macs`, :meth:`macs_after`) are multiply-adds with
    the element-wise flops counted as half a multiply-add each (a multiply-add is two flops), so
    their ratios are the ratios of XLA's flop counts.

    Spectra (:meth:`spectrum`) and factors (:meth:`factors`) are computed once per layer and
    cached: a rule's choice and the factors applied after it share one SVD (on CPU, a layer
    of :data:`SPECTRUM_FIRST` or more gets its spectrum alone first, see :meth:`prepare`).
    """

    sites: list[ConvSite]
    kernels: dict[str, np.ndarray]
    covariances: dict[str, np.ndarray] | None = None
    multiple: int | None = None
    score: Callable[[Mapping[str, int]], float] | None = None
    net_macs: int | None = None
    net_elementwise: float = 0
    net_constant: int = 0
    notes: tuple[str, ...] = ()
    source: tuple = dataclasses.field(default=(), repr=False)
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def candidates(self) -> list[ConvSite]:
        return [s for s in self.sites if s.candidate]

    @property
    def fixed_macs(self) -> float:
        """Multiply-adds no rule can change: the whole net's but the candidates' when
        ``net_macs`` is known (element-wise work included), else the other sites' (skipped,
        already pairs)."""
        if self.net_macs is not None:
            return self.full_macs - sum(s.full_macs for s in self.candidates)
        total = 0
        for s in self.sites:
            if s.shape is None or s.candidate:
                continue
            total += (costs.conv_cost(s.shape) if s.rank is None
                      else costs.lowrank_cost(s.shape, s.rank)).macs
        return total

    @property
    def full_macs(self) -> float:
        """Multiply-adds before the surgery: the whole net's (``net_macs``, with the
        element-wise work) when known, else every site's at full rank."""
        if self.net_macs is not None:
            return self.net_macs + self.net_elementwise / 2
        return sum(costs.conv_cost(s.shape).macs for s in self.sites if s.shape is not None)

    def macs_after(self, ranks: Mapping[str, int | None]) -> float:
        """Multiply-adds (counted as :attr:`full_macs` is) with each candidate in ``ranks`` split
        at its rank and every other candidate full."""
        return self.fixed_macs + sum(
            s.full_macs if ranks.get(s.path) is None
            else costs.lowrank_cost(s.shape, ranks[s.path]).macs for s in self.candidates)

    def site(self, path: str) -> ConvSite:
        return {s.path: s for s in self.sites}[path]

    def multiple_of(self, path: str) -> int | None:
        """``multiple`` for the layer's rank: for each iteration of a stacked layer's."""
        return self.multiple and self.multiple * self.site(path).stack

    def reusing(self, earlier: RankProblem | None, calibration=None) -> RankProblem:
        """This problem, made data-free, with ``earlier``'s calibration statistics, notes and
        cached spectra and factors (``earlier``: the ``.problem`` of a decomposition of the same
        model and weights), so that a sweep of rules calibrates and factors each layer once;
        ``None``: this problem as it is. The example call may differ (the costs are this one's).

        Raises:
          ValueError: ``calibration`` given as well (``earlier`` carries the statistics it was
            calibrated with), or ``earlier`` made from another model (its layers' paths, kinds,
            kernel shapes) or other weights (any variable), naming the first difference.
        """
        if earlier is None:
            return self
        if not isinstance(earlier, RankProblem):
            raise ValueError("problem= must be the .problem of an earlier decomposition; got "
                             f"{type(earlier).__name__}")
        if calibration is not None:
            raise ValueError("give calibration= or problem=, not both: the problem carries the "
                             "calibration statistics it was made with")

        def layers(problem):
            return {s.path: (s.kind, s.shape and s.shape.kernel_shape,
                             s.shape and s.shape.groups, s.stack) for s in problem.sites}

        here, there = layers(self), layers(earlier)
        for path in sorted(here.keys() | there.keys()):
            if here.get(path) != there.get(path):
                raise ValueError(
                    f"problem= was made from another model: its layer {path!r} is "
                    f"{there.get(path, 'absent')}, this model's {here.get(path, 'absent')} "
                    "((kind, kernel shape, groups, stack))")
        mine, theirs = dict(self.source), dict(earlier.source)
        for name in sorted(mine.keys() | theirs.keys()):
            a, b = mine.get(name), theirs.get(name)
            if a is b:
                continue
            if a is None or b is None or np.shape(a) != np.shape(b) or not np.array_equal(
                    np.asarray(a), np.asarray(b)):
                raise ValueError(f"problem= was made from other weights: variable {name} "
                                 "differs; decompose these weights with calibration= instead")
        return dataclasses.replace(self, covariances=earlier.covariances, notes=earlier.notes,
                                   _cache=earlier._cache)

    def restricted(self, rule) -> RankProblem:
        """The problem with the candidates that ``rule`` (a :class:`lrjax.rules.RankRule`)
        rules out by include/exclude marked skipped (their cost then counts as fixed); caches
        are shared."""
        return self.keeping_full({s.path: "excluded by the rank rule's include/exclude"
                                  for s in self.candidates if not rule.allows(s.path)})

    def keeping_full(self, why: Mapping[str, str]) -> RankProblem:
        """The problem with the candidates in ``why`` (``{path: reason}``) marked skipped
        (their cost then counts as fixed); caches are shared."""
        if not why:
            return self
        sites = [dataclasses.replace(s, skip=why[s.path]) if s.candidate and s.path in why
                 else s for s in self.sites]
        return dataclasses.replace(self, sites=sites)

    def prepare(self, paths=None) -> None:
        """Decompose the layers in ``paths`` (default: every candidate) once each, in parallel
        on CPU (:func:`lrjax.decompose.spectra_and_factors`): the spectrum a rule reads and the
        factors at the largest rank, whose slices are every smaller rank's factors. On CPU a
        layer whose smaller matrix side is :data:`SPECTRUM_FIRST` or more gets its spectrum
        alone (LAPACK's two-stage solver without vectors: 1.4 s at 4096 against 7.7 s with
        them, one thread), its factors at the rank chosen (:meth:`prepare_factors`), if any."""
        paths = [s.path for s in self.candidates] if paths is None else list(paths)
        todo = [p for p in paths if ("spectrum", p) not in self._cache]
        shapes = {p: self.site(p).shape for p in todo}
        done = decompose.spectra_and_factors(
            {p: self.kernels[p] for p in todo},  # host arrays: the CPU route reads them there
            groups={p: v.groups for p, v in shapes.items()}, input_covs=self._covs(todo),
            values_only={p for p, v in shapes.items() if costs.max_rank(
                v.kernel_shape, groups=v.groups) >= SPECTRUM_FIRST * v.groups}) if todo else {}
        for path, (values, factors) in done.items():
            self._cache[("spectrum", path)] = np.asarray(values, np.float64)
            if factors is not None:
                self._cache[("factors", path)] = _on_host(factors)

    def _covs(self, paths):
        return None if self.covariances is None else {p: self.covariances.get(p) for p in paths}

    def prepare_factors(self, ranks: Mapping[str, int | None]) -> None:
        """Compute, in parallel on CPU, the factors at ``ranks`` no cached factors hold."""
        todo = {p: r for p, r in ranks.items() if r is not None and (
            ("factors", p) not in self._cache or self._cache["factors", p].vertical.shape[-1] < r)}
        done = decompose.decompose_net(
            {p: self.kernels[p] for p in todo}, todo, input_covs=self._covs(todo),
            groups={p: self.site(p).shape.groups for p in todo}) if todo else {}
        self._cache.update({("factors", p): _on_host(f) for p, f in done.items()})

    def spectrum(self, path: str, compute: bool = True) -> np.ndarray | None:
        """Singular values ``(groups, R)`` of the layer's (whitened, when calibrated) matrix
        (``compute=False``: ``None`` unless already computed)."""
        if compute:
            self.prepare([path])
        return self._cache.get(("spectrum", path))

    def spectral_error(self, path: str, rank: int) -> float:
        """The relative error ``||W - W_K|| / ||W||`` at total rank ``rank`` read off the
        (whitened, when calibrated) spectrum: the kernel error data-free, the weighted error
        calibrated."""
        s = np.square(self.spectrum(path))
        k = rank // self.site(path).shape.groups
        return float(np.sqrt(s[:, k:].sum() / max(s.sum(), np.finfo(np.float64).tiny)))

    def factors(self, path: str, rank: int) -> decompose.Factors:
        """Closed-form factors of ``path`` at ``rank`` (NumPy arrays), cached at the largest rank
        asked for so far (smaller ranks are slices of it, taken on the host: truncated SVD
        factors are nested)."""
        groups = self.site(path).shape.groups
        self.prepare_factors({path: rank})
        cached = self._cache[("factors", path)]
        if cached.vertical.shape[-1] == rank:
            return cached
        return decompose.truncate(cached, rank, groups=groups)


def _on_host(factors: decompose.Factors) -> decompose.Factors:
    """Factors as NumPy arrays: slicing and reshaping them then compiles nothing."""
    return decompose.Factors(*(np.asarray(f) for f in factors))
