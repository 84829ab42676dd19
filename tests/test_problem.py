"""A decomposition's ``.problem`` passed back as ``problem=``: a sweep of rules on one model and
one set of weights calibrates and factors each layer once, with the same results as calibrating
afresh; a problem from another model or other weights is refused, naming the difference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrjax
from lrjax import decompose, surgery
from tests.helpers import apply, init, normal


class Small(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), name="c1")(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=2, name="c2")(x))
        x = nn.relu(nn.Conv(32, (1, 1), name="c3")(x))
        return nn.Dense(10, name="fc")(x.mean((1, 2)))


class SmallNNX(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(3, 16, (3, 3), rngs=rngs)
        self.c2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
        self.fc = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.c2(nnx.relu(self.c1(x))))
        return self.fc(x.mean((1, 2)))


X = normal(0, (2, 16, 16, 3))
CALIB = normal(1, (16, 16, 16, 3)) * jnp.array([0.3, 1.0, 2.0])
RULES = ("speedup:1.5", "speedup:2.5", "energy:0.8", {"c1": 4, "fc": 3})


def _no_svd(monkeypatch):
    """Every SVD of a reused problem is cached: computing one fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a layer was decomposed again")

    monkeypatch.setattr(decompose, "spectra_and_factors", refuse)
    monkeypatch.setattr(decompose, "decompose_net", refuse)


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                    strict=True))


@pytest.mark.slow  # 4 s on the 2-core machine: the default run stays under 5 minutes
def test_a_linen_sweep_calibrates_and_decomposes_once(monkeypatch):
    model = Small()
    variables = init(model, 0, X)
    first = lrjax.decompose_linen(model, variables, X, rule="speedup:2", calibration=CALIB)
    first.problem.prepare()  # every layer's SVD, as a sweep of speedup rules needs them
    fresh = {str(r): lrjax.decompose_linen(model, variables, X, rule=r, calibration=CALIB)
             for r in RULES}
    _no_svd(monkeypatch)
    monkeypatch.setattr(surgery, "calibration_moments", lambda *a, **k: pytest.fail("calibrated"))
    for rule in RULES:
        reused = lrjax.decompose_linen(model, variables, X, rule=rule, problem=first.problem)
        want = fresh[str(rule)]
        assert reused.ranks == want.ranks and reused.report.speedup == want.report.speedup
        # the same factors (a rank map alone computes only its layers' SVDs, at their ranks:
        # the same closed form to rounding, where the sweep slices the cached full one)
        np.testing.assert_allclose(apply(reused.module, reused.variables, X),
                                   apply(want.module, want.variables, X), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(list(reused.report.weighted_errors.values()),
                                   list(want.report.weighted_errors.values()), rtol=1e-4)
        if isinstance(rule, str):
            assert _leaves_equal(reused.variables, want.variables), rule
    larger = jnp.zeros((1, 32, 32, 3))  # another example size: its own costs, the same factors
    other = lrjax.decompose_linen(model, variables, larger, rule={"c1": 4}, problem=first.problem)
    assert other.report.net_macs[0] == lrjax.macs.traced_macs(
        lambda v, x: model.apply(v, x), variables, larger)["total"] > 3 * want.report.net_macs[0]
    assert np.array_equal(other.variables["params"]["c1"]["vertical"]["kernel"],
                          reused.variables["params"]["c1"]["vertical"]["kernel"])


def test_a_problem_from_other_weights_or_another_model_is_refused():
    model = Small()
    variables = init(model, 0, X)
    first = lrjax.decompose_linen(model, variables, X, rule="speedup:2", calibration=CALIB)
    with pytest.raises(ValueError, match="give calibration= or problem=, not both"):
        lrjax.decompose_linen(model, variables, X, rule="speedup:2", calibration=CALIB,
                              problem=first.problem)
    retrained = jax.tree.map(lambda v: v, variables)
    retrained["params"]["c2"]["bias"] = variables["params"]["c2"]["bias"] + 1
    with pytest.raises(ValueError, match=r"other weights: variable \['params'\]\['c2'\]\['bias'\] "
                                         r"differs"):
        lrjax.decompose_linen(model, retrained, X, rule="speedup:2", problem=first.problem)
    copied = jax.tree.map(jnp.array, variables)  # equal values, other arrays: accepted
    lrjax.decompose_linen(model, copied, X, rule="speedup:2", problem=first.problem)
    nnx_model = SmallNNX(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"another model: its layer 'c3' is \('1x1'"):
        lrjax.decompose_nnx(nnx_model, X, rule="speedup:2", problem=first.problem)
    with pytest.raises(ValueError, match="the .problem of an earlier decomposition; got dict"):
        lrjax.decompose_linen(model, variables, X, rule="speedup:2", problem={})


def test_an_nnx_sweep_calibrates_and_decomposes_once(monkeypatch):
    model = SmallNNX(nnx.Rngs(0))
    first = lrjax.decompose_nnx(model, X, rule="speedup:2", calibration=CALIB)
    first.problem.prepare()
    fresh = lrjax.decompose_nnx(model, X, rule="speedup:1.5", calibration=CALIB)
    model(X)  # run as built (training mode): only its random streams move, which are not weights
    with monkeypatch.context() as patch:
        _no_svd(patch)
        reused = lrjax.decompose_nnx(model, X, rule="speedup:1.5", problem=first.problem)
    assert reused.ranks == fresh.ranks
    assert _leaves_equal(nnx.state(reused.module, nnx.Param), nnx.state(fresh.module, nnx.Param))
    model.c1.kernel.set_value(model.c1.kernel[...] * 2)
    with pytest.raises(ValueError, match=r"other weights: variable .*'c1'.*'kernel'"):
        lrjax.decompose_nnx(model, X, rule="speedup:1.5", problem=first.problem)
