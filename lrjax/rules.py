"""Rank rules, framework-neutral: the grammar, the rank problem, selection and the measured gate
(what a surgery did is :mod:`lrjax.report`'s).

A rank rule is parsed once into a :class:`RankRule` (:func:`parse_rule`); the linen and NNX
adapters (:mod:`lrjax.surgery`, :mod:`lrjax.nnx_surgery`) only find a model's linear layers
(:class:`lrjax.sites.ConvSite`), build its
:class:`RankProblem` and apply the factors that :func:`select_ranks` chooses. The command lines
take the same record.

The grammar of a rule written as a string (Python and command line alike)::

    BASE[+measured[:RUNTIME]][,OPTION=VALUE]...

``BASE`` is ``energy:F`` (keep fraction ``F`` of each layer's spectral energy), ``speedup:S``
(ranks for ``S`` times fewer flops of the whole forward pass, XLA's count: two per multiply-add
and the element-wise work, which is fixed), a shipped config (``vgg16``,
``caffenet``, ``nin``, ``cnn``), a JSON rank file, or an inline JSON map (``{"conv1": 16}``).
``+measured`` keeps a layer full where its pair is not faster when timed alone (``:jax``,
``:onnxruntime`` or ``:litert``: where it is timed); under ``speedup:S`` it keeps full the
layers whose pairs save less than a third of the time their multiply-adds promise, and the
budget goes to the other layers, so the whole-net target still holds. Options:
``multiple=M`` (round ranks to multiples of ``M``), ``include=GLOB`` and ``exclude=GLOB``
(repeatable; layer paths, ``fnmatch`` patterns: only matching layers / no matching layer may be
decomposed).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from lrjax import costs, gate, own_code, runtimes
from lrjax import ranks as rank_lib
from lrjax.gate import measured_gate
from lrjax.moments import calibration_batches
from lrjax.problem import RankProblem
from lrjax.sites import ConvSite

__all__ = [
    "RULE_HELP", "RankRule", "parse_rule", "ConvSite", "RankProblem", "select_ranks",
    "measured_gate", "calibration_batches", "DEFAULT_RUNTIME",
]

RULE_HELP = (
    "a rank rule: {layer path: rank} (null keeps a layer full; inline JSON on the command line), "
    "a JSON file of that map, a shipped config (vgg16, caffenet, nin, cnn), 'energy:F' (keep "
    "fraction F of each layer's spectral energy) or 'speedup:S' (allocate ranks for S times "
    "fewer flops of the whole forward pass, as XLA counts them); append '+measured' to keep a "
    "layer full rank where its pair is not faster on this backend (under 'speedup:S': saves "
    "less than a third of the time its multiply-adds promise, and the budget goes to the other "
    "layers), or '+measured:onnxruntime' / "
    "'+measured:litert' to time the layers in that runtime (each layer exported alone); then "
    "options ',multiple=M', ',include=GLOB', ',exclude=GLOB'; or a rule object such as "
    "lrjax.ranks.EvalGuided"
)

# '+measured' without a runtime: the backend the model runs on (JAX from Python; the export
# format's runtime in `python -m lrjax.export`)
DEFAULT_RUNTIME = "default"
_KINDS = ("energy", "speedup")
_OPTIONS = ("multiple", "include", "exclude")


# ---------------------------------------------------------------------------------------------
# The grammar


@dataclasses.dataclass(frozen=True)
class RankRule:
    """A parsed rank rule.

    Attributes:
      kind: ``"map"`` (explicit ranks), ``"energy"``, ``"speedup"`` or ``"object"`` (a callable
        ``rule(problem) -> {path: rank}`` or an object with ``select(problem)``, e.g.
        :class:`lrjax.ranks.EvalGuided`).
      ranks: ``{path: rank or None}`` for ``"map"``.
      value: the energy fraction or the target speedup.
      selector: the rule object for ``"object"``.
      measured: where ``+measured`` times the layers (a runtime of
        :data:`lrjax.runtimes.RUNTIMES` or :data:`DEFAULT_RUNTIME`), or ``None``: no gate.
      multiple: round ranks to multiples of this, or ``None``.
      include, exclude: ``fnmatch`` patterns of layer paths that may / may not be decomposed.
      source: the rule as the user wrote it (for messages).
    """

    kind: str
    ranks: Mapping[str, int | None] | None = None
    value: float | None = None
    selector: Any = None
    measured: str | None = None
    multiple: int | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    source: str = ""

    @property
    def eval_fn(self):
        """The evaluation function of an eval-guided rule, else ``None``."""
        return self.selector.eval_fn if isinstance(self.selector, rank_lib.EvalGuided) else None

    @property
    def budgeted(self) -> bool:
        """Whether the rule chooses ranks itself under a budget (its ranks are not rounded)."""
        return self.kind in _KINDS

    def base(self) -> RankRule:
        """The same rule without the gate and without rounding (what rounding is compared with)."""
        return dataclasses.replace(self, measured=None, multiple=None)

    def with_runtime(self, runtime: str) -> RankRule:
        """``+measured`` without a runtime resolved to ``runtime``; other rules unchanged."""
        if self.measured != DEFAULT_RUNTIME:
            return self
        return dataclasses.replace(self, measured=runtime)

    def allows(self, path: str) -> bool:
        """Whether ``include`` / ``exclude`` let the rule decompose layer ``path``."""
        if self.include and not any(fnmatch.fnmatchcase(path, g) for g in self.include):
            return False
        return not any(fnmatch.fnmatchcase(path, g) for g in self.exclude)

    def __str__(self) -> str:
        return self.source or self.kind


def _bad(rule: str, why: str) -> ValueError:
    return ValueError(f"bad rank rule {rule!r}: {why}")


def _number(rule: str, kind: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _bad(rule, f"'{kind}:' must be followed by a number; got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise _bad(rule, f"the number after '{kind}:' must be positive; got {text!r}")
    if kind == "energy" and value > 1:
        raise _bad(rule, f"the energy fraction must be in (0, 1]; got {value:g}")
    if kind == "speedup" and value <= 1:
        raise _bad(rule, f"the target speedup must be > 1 (S times fewer flops); got "
                         f"{value:g}")
    return value


def _split_options(rule: str) -> tuple[str, list[str]]:
    """``'BASE,k=v,...'`` -> ``(BASE, ['k=v', ...])``; an inline JSON map may hold commas."""
    text = rule.strip()
    if text.startswith("{"):
        try:
            _, end = json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError as e:
            raise _bad(rule, f"inline rank map is not valid JSON: {e}") from None
        rest = text[end:]
        base, _, options = rest.partition(",")
        return text[:end] + base, [o for o in options.split(",") if o] if options else []
    base, *options = text.split(",")
    return base, options


def _parse_string(rule: str) -> dict:
    base, options = _split_options(rule)
    fields: dict[str, Any] = {"include": [], "exclude": []}
    for option in options:
        key, eq, value = option.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in _OPTIONS or not value:
            raise _bad(rule, f"option {option!r} is not one of "
                             f"{', '.join(k + '=...' for k in _OPTIONS)}")
        if key == "multiple":
            try:
                fields["multiple"] = int(value)
            except ValueError:
                raise _bad(rule, f"multiple must be an int; got {value!r}") from None
        else:
            fields[key].append(value)
    if "+measured" in base:
        base, _, where = base.rpartition("+measured")
        if where and (not where.startswith(":") or where[1:] not in runtimes.RUNTIMES):
            raise _bad(rule, f"'+measured{where}' is not '+measured' or '+measured:R' with R "
                             f"in {runtimes.RUNTIMES}")
        fields["measured"] = where[1:] or DEFAULT_RUNTIME
    base = base.strip()
    if base in ("", "measured"):
        raise _bad(rule, "'+measured' gates another rule: use e.g. 'vgg16+measured'")
    kind, colon, number = base.partition(":")
    if colon and kind in _KINDS:
        fields.update(kind=kind, value=_number(rule, kind, number))
    elif base.startswith("{"):
        try:
            data = json.loads(base)
        except json.JSONDecodeError as e:
            raise _bad(rule, f"inline rank map is not valid JSON: {e}") from None
        fields.update(kind="map", ranks=rank_lib.check_rank_map(data, "the inline rank map"))
    elif base in rank_lib.PUBLISHED or os.path.exists(base) or base.endswith(".json"):
        fields.update(kind="map", ranks=rank_lib.load_ranks(base))
    elif colon:
        raise _bad(rule, f"unknown rule kind {kind + ':'!r}; expected 'energy:F', 'speedup:S', "
                         f"a shipped config ({', '.join(rank_lib.PUBLISHED)}), a JSON file or "
                         "an inline JSON map")
    else:
        fields.update(kind="map", ranks=rank_lib.load_ranks(base))
    return fields


def parse_rule(rule, *, multiple: int | None = None) -> RankRule:
    """Parse a rank rule (see the module docstring and :data:`RULE_HELP`) into a :class:`RankRule`.

    Args:
      rule: a :class:`RankRule` (returned as is, but for ``multiple``), a mapping
        ``{path: rank or None}``, a string of the grammar, a callable ``rule(problem)`` or an
        object with ``select(problem)``.
      multiple: round ranks to multiples of this (the rule's own ``multiple=`` option wins when
        both are given and agree; they must not disagree).

    Raises:
      ValueError: a malformed rule (naming it and what is wrong), an unreadable rank file, a
        rank map that is not ``{str: int or null}``, or a bad ``multiple``.
    """
    if isinstance(rule, RankRule):
        parsed = rule
    elif isinstance(rule, Mapping):
        parsed = RankRule("map", ranks=rank_lib.check_rank_map(dict(rule), "the rank map"),
                          source="rank map")
    elif isinstance(rule, str):
        fields = _parse_string(rule)
        parsed = RankRule(include=tuple(fields.pop("include")),
                          exclude=tuple(fields.pop("exclude")), source=rule, **fields)
    elif hasattr(rule, "select") or callable(rule):
        parsed = RankRule("object", selector=rule, source=type(rule).__name__)
    else:
        raise ValueError(f"unknown rank rule {rule!r}; expected {RULE_HELP}")
    if multiple is not None and parsed.multiple is not None and multiple != parsed.multiple:
        raise ValueError(f"rank rule {parsed} asks for multiple={parsed.multiple} but "
                         f"multiple={multiple} was given")
    multiple = parsed.multiple if multiple is None else multiple
    if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int)
                                 or multiple < 1):
        raise ValueError(f"multiple must be a positive int; got {multiple!r}")
    return dataclasses.replace(parsed, multiple=None if multiple == 1 else multiple)


# ---------------------------------------------------------------------------------------------
# Selection


def _left_as_is(sites) -> str:
    """``", including N layers left as they are (the largest: path: reason)"``: the one holding
    the largest share of the net's multiply-adds where shares are known (products the model's
    own code computes), else the first; or ``""``."""
    skipped = [s for s in sites if not s.candidate and s.skip]
    if not skipped:
        return ""
    largest = max(skipped, key=lambda s: -1.0 if s.share is None else s.share)
    which = "the largest" if len(skipped) > 1 and largest.share is not None else "the first"
    named = largest if largest.share is not None else skipped[0]
    return (f", including {len(skipped)} layer{'s' * (len(skipped) > 1)} left as "
            f"{'they are' if len(skipped) > 1 else 'it is'} ({which}: {named.path}: "
            f"{named.skip})")


def _constant(problem: RankProblem) -> str:
    """What an "out of reach" message says of the net's products with constants, where they
    hold a tenth or more of its cost; else ``""``."""
    share = problem.net_constant / problem.full_macs if problem.full_macs else 0.0
    if share < 0.1:
        return ""
    return (f"; {share:.0%} of the net's cost multiplies the data by constants, which are no "
            "layer: a fixed filter, or weights the model holds outside its variables (layers "
            "kept in a closure, which Flax does not see as part of the model: make them "
            "attributes of a module to have them found)")


def _budget_ranks(problem: RankProblem, target: float) -> dict[str, int | None]:
    """``speedup:S``: the greedy allocation meeting ``S`` times fewer flops of the whole net
    when traced (:class:`RankProblem`), else multiply-adds over the sites; out of reach: the
    largest reachable speedup."""
    candidates = [s.shape for s in problem.candidates]
    units = {layer.name: math.lcm(problem.multiple_of(layer.name) or 1, layer.groups)
             for layer in candidates}
    floor = problem.macs_after({  # every candidate at its smallest rank that saves
        layer.name: units[layer.name] for layer in candidates
        if rank_lib.saving_rank(layer, units[layer.name]) is not None})
    if problem.full_macs / floor < target:
        scope = ("flops of the whole net (XLA's count: 2 per multiply-add and the element-wise "
                 "work)" if problem.net_macs is not None
                 else "multiply-adds over the model's linear layers")
        raise ValueError(f"speedup {target} is out of reach: the smallest ranks give "
                         f"{problem.full_macs / floor:.2f}x fewer {scope}; "
                         f"{problem.fixed_macs / problem.full_macs:.0%} of it is in what no "
                         f"rule can change{_left_as_is(problem.sites)}{_constant(problem)}")
    problem.prepare()
    spectra = {s.name: problem.spectrum(s.name) for s in candidates}
    alloc = rank_lib.allocate_ranks(candidates, problem.kernels,
                                    macs_budget=problem.full_macs / target - problem.fixed_macs,
                                    multiple={s.path: problem.multiple_of(s.path)
                                              for s in problem.candidates}, spectra=spectra,
                                    overhead={s.path: s.parametrization_flops / 2
                                              for s in problem.candidates})
    return alloc.ranks


def _base_ranks(rule: RankRule, problem: RankProblem) -> dict[str, int | None]:
    if rule.kind == "map":
        return {p: (r if rule.allows(p) else None) for p, r in rule.ranks.items()}
    if rule.kind == "object":
        select = getattr(rule.selector, "select", rule.selector)
        return dict(select(problem))
    if rule.kind == "energy":
        problem.prepare()
        return {s.path: rank_lib.energy_rank(problem.kernels[s.path], rule.value,
                                             groups=s.shape.groups, multiple=problem.multiple_of(s.path),
                                             spectrum=problem.spectrum(s.path))
                for s in problem.candidates}
    return _budget_ranks(problem, rule.value)


def _no_candidates(problem: RankProblem) -> ValueError:
    found = own_code.grouped(problem.sites)
    return ValueError("the model has no layer this rule can decompose"
                      + (f" (found {found})" if found else " (it calls no conv or dense layer)")
                      + _constant(problem))


def select_ranks(rule, problem: RankProblem, *, measure_batch: int = 1,
                 kept_full: dict | None = None) -> dict[str, int | None]:
    """Resolve a rank rule to ``{path: rank or None}`` (see :data:`RULE_HELP`).

    A rule that chooses ranks itself (``energy:``, ``speedup:``, a rule object) never splits a
    layer whose pair would cost as many multiply-adds as the conv or more: such a layer is kept
    full. A rank map is applied as written. With ``+measured`` the layers whose pairs are not
    faster when timed alone stay full; under ``speedup:S`` a layer stays full where its pair
    saves less than a third of the time its multiply-adds promise, and the budget is allocated
    again over the other layers until every pair chosen returns that much (each layer timed
    once per rank); where that puts ``S`` out of reach, the pairs that returned the most are let
    back in.

    Args:
      rule: anything :func:`parse_rule` takes; its ``multiple`` must be the problem's.
      problem: the model's layers and kernels (:class:`RankProblem`).
      measure_batch: batch of the ``+measured`` timings.
      kept_full: if given, filled with ``{path: why}`` of the candidates the rule left full.

    Raises:
      ValueError: a bad rule, a model with no layer the rule can decompose, a layer the model
        does not have (the message lists the decomposable ones), a layer that cannot be
        decomposed, or a rank out of range.
    """
    rule = parse_rule(rule)
    kept_full = {} if kept_full is None else kept_full
    kept_full.update({s.path: "excluded by the rule's include/exclude"
                      for s in problem.candidates if not rule.allows(s.path)})
    problem = problem.restricted(rule)
    if rule.kind != "map" and not problem.candidates:
        raise _no_candidates(problem)
    if rule.measured and rule.kind == "speedup":
        return _measured_budget(rule, problem, _runtime(rule), measure_batch, kept_full)
    by_path = {s.path: s for s in problem.sites}
    ranks = _base_ranks(rule, problem)
    unknown = sorted(set(ranks) - set(by_path))
    if unknown:
        raise ValueError(f"rank rule names unknown layers {unknown}; the model's decomposable "
                         f"layers are {sorted(s.path for s in problem.candidates)}")
    out = {}
    for path, r in ranks.items():
        if r is None:
            out[path] = None
            continue
        site = by_path[path]
        if not site.candidate:
            raise ValueError(f"layer {path!r} cannot be decomposed: "
                             f"{site.skip or 'it already is a pair'}")
        layer = site.shape
        top = costs.max_rank(layer.kernel_shape, groups=layer.groups)
        if problem.multiple and not rule.budgeted and isinstance(r, (int, np.integer)) \
                and not isinstance(r, bool) and 1 <= r <= top:
            r = rank_lib.round_rank(int(r), problem.multiple_of(path), top=top,
                                    groups=layer.groups)
        r = costs.check_rank(r, layer.kernel_shape, groups=layer.groups, where=site.where)
        if rule.kind != "map" and costs.lowrank_cost(layer, r).macs >= \
                costs.conv_cost(layer).macs:
            kept_full[path] = f"rank {r} would save nothing (its pair costs as much as the layer)"
            r = None
        out[path] = r
    for s in problem.candidates:
        if rule.kind != "map" and out.get(s.path) is None and s.path not in kept_full:
            unit = math.lcm(problem.multiple_of(s.path) or 1, s.shape.groups)
            kept_full[s.path] = ("no pair of it saves multiply-adds"
                                 if rank_lib.saving_rank(s.shape, unit) is None
                                 else "not needed by the rule")
    if rule.measured:
        runtime = _runtime(rule)
        chosen = {p: r for p, r in out.items() if r is not None}
        gated, _ = gate.measured_gate([by_path[p].shape for p in chosen], chosen,
                                      batch=measure_batch, runtime=runtime)
        kept_full.update({p: f"its pair was not faster, timed in {runtime}"
                          for p, r in gated.items() if r is None})
        out.update(gated)
    return out


def _runtime(rule: RankRule) -> str:
    """Where a ``+measured`` rule times the layers."""
    return "jax" if rule.measured == DEFAULT_RUNTIME else rule.measured


def _measured_budget(rule: RankRule, problem: RankProblem, runtime: str, batch: int,
                     kept_full: dict) -> dict[str, int | None]:
    """``speedup:S+measured``: the budget allocated over the layers whose pairs pay off.

    The layers the allocation splits are timed alone at their ranks (:func:`measured_gate`);
    those whose pair saves less than :data:`lrjax.gate.MIN_RETURN` (a third) of the time its
    multiply-adds promise are kept full and the budget is allocated again over the others,
    until every pair chosen returns that much. The whole-net target holds throughout: where
    keeping them all full puts it out of reach, the one that returned the most is let back in
    (and not gated again) until it is reachable. Each ``(layer, rank)`` is timed once."""
    ungated = dataclasses.replace(rule, measured=None)
    by_path = {s.path: s for s in problem.sites}
    times, slow, returns, let_back = {}, {}, {}, set()
    while True:
        notes = {}
        try:
            ranks = select_ranks(ungated, problem.keeping_full(slow), kept_full=notes)
        except ValueError:
            if not slow:
                raise
            best = max(slow, key=returns.__getitem__)
            del slow[best]
            let_back.add(best)
            continue
        chosen = {p: r for p, r in ranks.items() if r is not None}
        todo = {p: r for p, r in chosen.items() if (p, r) not in times}
        if todo:
            _, timed = gate.measured_gate([by_path[p].shape for p in todo], todo,
                                          batch=batch, runtime=runtime)
            times.update({(p, todo[p]): t for p, t in timed.items()})
        judged = {p: r for p, r in chosen.items() if p not in let_back and (p, r) in times}
        newly, judged_returns = gate.poor_returns(
            {p: by_path[p].shape for p in judged}, judged,
            {p: times[(p, r)] for p, r in judged.items()},
            where=f"timed in {runtime} at batch {batch}")
        returns.update(judged_returns)
        if not newly:
            break
        slow.update(newly)
    kept_full.update(notes)
    kept_full.update(slow)
    return {**ranks, **{p: None for p in slow}}
