"""lrjax.formulations: the policy, each CPU formulation against XLA's op, and the portable path."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrjax import formulations as F
from lrjax import macs, models, surgery, train
from tests.helpers import grid, init

on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu",
                            reason="asserts what the 'auto' policy picks on the CPU backend")
DN = ("NHWC", "HWIO", "NHWC")


def _close(a, b, tol=1e-4):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


def test_policy_context_setter_and_errors():
    assert F.get_policy() == "auto"
    with F.policy("portable"):
        assert F.active() == "portable"
        with F.policy("cpu"):
            assert F.active() == "cpu"
        assert F.get_policy() == "portable"
    assert F.get_policy() == "auto"
    F.set_policy("portable")
    try:
        assert F.active() == "portable"
    finally:
        F.set_policy("auto")
    with pytest.raises(ValueError, match="must be one of .* got 'fast'"):
        F.policy("fast")
    with pytest.raises(ValueError, match="got 'gpu'"):
        F.set_policy("gpu")


@on_cpu
def test_auto_is_cpu_on_the_cpu_backend():
    assert F.active() == "cpu"


def test_a_policy_change_retraces_a_jitted_function():
    traces = []

    @jax.jit
    def f(x):
        traces.append(F.active())
        return x + 1

    with F.policy("portable"):
        f(1.0)
        f(2.0)
    with F.policy("cpu"):
        f(3.0)
    assert traces == ["portable", "cpu"]


@pytest.mark.parametrize("p,o", [(5, 7), (7, 5)])  # both transpose orders of the kernel gradient
def test_channel_matmul_matches_einsum(p, o):
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, p))
    w = jax.random.normal(jax.random.key(1), (p, o))

    def loss(mm, x, w):
        return jnp.sum(jnp.sin(mm(x, w)))

    ref = jax.value_and_grad(functools.partial(
        loss, lambda x, w: jnp.einsum("...p,po->...o", x, w)), argnums=(0, 1))(x, w)
    ours = jax.jit(jax.value_and_grad(functools.partial(loss, F.channel_matmul),
                                      argnums=(0, 1)))(x, w)
    _close(ours, ref, 1e-5)


@pytest.mark.parametrize("kernel,strides,padding,dilation,cin,cout", grid([
    ((1, 1), (1, 1), "SAME", (1, 1)), ((1, 1), (2, 2), "VALID", (1, 1)),
    ((1, 1), (2, 3), ((0, 0), (0, 0)), (1, 1)), ((1, 1), (2, 3), ((1, 0), (0, 2)), (1, 1)),
    ((5, 1), (1, 1), "SAME", (1, 1)), ((3, 1), (2, 1), ((2, 1), (0, 0)), (2, 1)),
    ((1, 3), (2, 2), ((0, 0), (1, 2)), (1, 1)), ((1, 3), (1, 1), "VALID", (1, 2)),
    # padding on an axis of kernel size 1 (zero output rows), and negative padding (a crop)
    ((1, 3), (1, 2), ((1, 1), (0, 0)), (1, 1)), ((1, 3), (3, 1), ((4, 2), (1, 1)), (1, 1)),
    ((3, 1), (1, 1), ((-1, 2), (1, -1)), (1, 1)), ((1, 1), (2, 1), ((-1, 2), (3, -2)), (1, 1)),
], [(6, 3), (3, 7)]))  # (cin, cout): both matmul orders
def test_conv1d_as_matmul_matches_lax(kernel, strides, padding, dilation, cin, cout):
    x = jax.random.normal(jax.random.key(0), (2, 9, 8, cin))
    w = jax.random.normal(jax.random.key(1), (*kernel, cin, cout))

    def loss(conv, x, w):
        return jnp.sum(jnp.sin(conv(x, w, strides, padding, rhs_dilation=dilation,
                                    dimension_numbers=DN)))

    def value_and_grad(fn):  # jitted: one compile instead of one per operation
        return jax.jit(jax.value_and_grad(functools.partial(loss, fn), (0, 1)))(x, w)

    want = value_and_grad(jax.lax.conv_general_dilated)
    for fn in (F.conv1d_as_matmul, F.conv1d_matmul_when_differentiated):
        _close(value_and_grad(fn), want)
    if kernel == (1, 1):  # strides first, zero rows after: no product XLA's conv would skip
        ours, lax = (macs.traced_macs(functools.partial(loss, fn), x, w)["total"]
                     for fn in (F.conv1d_as_matmul, jax.lax.conv_general_dilated))
        assert ours == lax


def test_conv1d_matmul_when_differentiated_is_a_conv_alone_and_matmuls_in_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 9, 8, 4))
    w = jax.random.normal(jax.random.key(1), (5, 1, 4, 6))

    def f(x, w):
        return jnp.sum(F.conv1d_matmul_when_differentiated(x, w, (1, 1), "SAME",
                                                           dimension_numbers=DN))

    plain = str(jax.make_jaxpr(f)(x, w))
    assert "conv_general_dilated" in plain and "dot_general" not in plain
    assert "dot_general" in str(jax.make_jaxpr(jax.grad(f, (0, 1)))(x, w))
    with pytest.raises(ValueError, match=r"k x 1 or 1 x k .*\(3, 3, 4, 6\)"):
        F.conv1d_as_matmul(x, jnp.zeros((3, 3, 4, 6)), (1, 1), "SAME")
    with pytest.raises(ValueError, match="feature_group_count=2"):
        F.conv1d_as_matmul(x, jnp.zeros((3, 1, 2, 6)), (1, 1), "SAME", feature_group_count=2)


@pytest.mark.parametrize("policy", ["cpu", "portable"])
@pytest.mark.parametrize("kernel,padding", [
    ((3, 1), ((-1, 1), (0, 0))), ((1, 3), ((0, 0), (1, -2))), ((3, 3), ((-1, 1), (1, -1))),
    ((1, 1), ((-2, 0), (0, -1))),
])
def test_negative_padding_is_a_crop_of_the_input(kernel, padding, policy):
    """Negative padding crops the input. XLA:CPU computed a 3x1 conv padded ((-1, 1), (0, 0))
    wrong (inf, or values from outside the input, varying run to run: openxla/xla#48713);
    lrjax's convs (a pair's halves, the zoo's) slice the input first, so the conv it runs has
    none."""
    x = jax.random.normal(jax.random.key(0), (4, 16, 10, 16))
    w = jax.random.normal(jax.random.key(1), (*kernel, 16, 8))
    (lo_h, hi_h), (lo_w, hi_w) = padding
    cropped = x[:, max(-lo_h, 0):16 - max(-hi_h, 0), max(-lo_w, 0):10 - max(-hi_w, 0)]
    want = jax.lax.conv_general_dilated(
        cropped, w, (1, 1), [(max(lo_h, 0), max(hi_h, 0)), (max(lo_w, 0), max(hi_w, 0))],
        dimension_numbers=DN)
    with F.policy(policy):
        got = jax.jit(lambda x, w: F.conv_general_dilated(x, w, (1, 1), padding,
                                                          dimension_numbers=DN))(x, w)
    _close(got, want, 1e-5)


@pytest.mark.parametrize("kernel,groups,padding,expect_cpu", [
    ((1, 1), 1, "SAME", "dot_general"),
    ((3, 1), 1, "SAME", "custom_vjp"),
    ((1, 3), 1, ((0, 0), (1, 1)), "custom_vjp"),
    ((3, 1), 1, "CIRCULAR", "custom_vjp"),  # nn.Conv pads the input itself, then a VALID conv
    ((3, 3), 1, "SAME", "conv_general_dilated"),  # not a 1-D kernel: XLA's conv
    ((3, 1), 2, "SAME", "conv_general_dilated"),  # groups: XLA's conv
])
def test_conv_general_dilated_dispatch(kernel, groups, padding, expect_cpu):
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    conv = nn.Conv(6, kernel, padding=padding, feature_group_count=groups,
                   conv_general_dilated=F.conv_general_dilated)
    ref = nn.Conv(6, kernel, padding=padding, feature_group_count=groups)
    variables = init(ref, 1, x)

    def loss(m, v):
        return jnp.sum(jnp.sin(m.apply(v, x)))

    for name in ("cpu", "portable"):
        with F.policy(name):
            jaxpr = str(jax.make_jaxpr(jax.grad(functools.partial(loss, conv)))(variables))
            _close(jax.value_and_grad(functools.partial(loss, conv))(variables),
                   jax.value_and_grad(functools.partial(loss, ref))(variables))
        if name == "cpu":
            assert expect_cpu in jaxpr
        else:
            assert _custom_rules(jaxpr) == set() and "dot_general" not in jaxpr


@pytest.mark.parametrize("window,strides,padding,shape,name", grid([
    ((3, 3), (2, 2), "VALID", (2, 17, 17, 3)), ((2, 2), (2, 2), "VALID", (2, 8, 6, 2)),
    ((3, 3), (2, 2), "SAME", (1, 9, 10, 2)), ((3, 2), (1, 2), ((1, 0), (0, 1)), (2, 7, 9, 3)),
    ((3, 3), None, "VALID", (5, 5, 4)),  # no batch axis
], [("cpu",), ("portable",)]))
def test_max_pool_matches_flax(window, strides, padding, shape, name):
    x = jax.random.normal(jax.random.key(0), shape)  # continuous values: no ties
    ours = functools.partial(F.max_pool, window_shape=window, strides=strides, padding=padding)
    ref = functools.partial(nn.max_pool, window_shape=window, strides=strides, padding=padding)
    cotangent = jax.random.normal(jax.random.key(1), jax.eval_shape(ref, x).shape)

    @functools.partial(jax.jit, static_argnums=0)  # traced under the policy in force
    def value_and_grad(pool, x):
        y, vjp = jax.vjp(pool, x)
        return y, vjp(cotangent)[0]

    with F.policy(name):
        y_ours, grad_ours = value_and_grad(ours, x)
    y_ref, grad_ref = value_and_grad(ref, x)
    np.testing.assert_array_equal(y_ours, y_ref)
    np.testing.assert_allclose(grad_ours, grad_ref, rtol=1e-6, atol=1e-6)


def test_max_pool_ties_share_the_gradient_under_cpu():
    x = jnp.zeros((1, 3, 3, 1)).at[0, 1, 2, 0].set(-1.0)  # eight inputs tie for the maximum
    with F.policy("cpu"):
        grad = jax.grad(lambda x: F.max_pool(x, (3, 3), (1, 1)).sum())(x)
    assert grad[0, 1, 2, 0] == 0
    assert bool(jnp.all(grad >= 0))
    np.testing.assert_allclose(grad.sum(), 1.0, rtol=1e-6)


def test_max_pool_jaxprs_per_policy():
    x = jnp.ones((2, 9, 9, 3))
    pool = functools.partial(F.max_pool, window_shape=(3, 3), strides=(2, 2))
    with F.policy("cpu"):
        assert "reduce_window_max" in str(jax.make_jaxpr(pool)(x))
        grad = str(jax.make_jaxpr(jax.grad(lambda x: pool(x).sum()))(x))
        assert "select_and_scatter" not in grad and "reduce_window" not in grad
        _, tangent = jax.jvp(pool, (x,), (jnp.ones_like(x),))  # custom_jvp: forward mode works
        np.testing.assert_allclose(tangent, jnp.ones((2, 4, 4, 3)))
    with F.policy("portable"):
        assert "custom" not in str(jax.make_jaxpr(jax.grad(lambda x: pool(x).sum()))(x))
        assert "select_and_scatter" in str(jax.make_jaxpr(jax.grad(lambda x: pool(x).sum()))(x))


@pytest.mark.parametrize("window,strides,padding,shape,match", [
    ((3, 3), (2,), "VALID", (1, 8, 8, 1), "strides"),
    ((9, 9), (1, 1), "VALID", (1, 8, 8, 1), r"do not fit .*\(1, 8, 8, 1\)"),
    ((2, 2), (2, 2), ((1, 1),), (1, 8, 8, 1), "padding"),
    ((2, 2), (0, 2), "VALID", (1, 8, 8, 1), "strides"),
])
def test_max_pool_bad_input(window, strides, padding, shape, match):
    with pytest.raises(ValueError, match=match):
        F.max_pool(jnp.zeros(shape), window, strides, padding)


SMALL = {  # zoo families shrunk for tracing: (input size, overrides)
    "nin": (32, {}),
    "cnn": (32, {}),
    "vgg16": (32, {"widths": ((4, 4), (8, 8), (8, 8, 8), (8, 8, 8), (8, 8, 8)),
                   "fc_features": 16, "num_classes": 10}),
    "caffenet": (67, {"widths": (8, 16, 16, 16, 16), "fc_features": 16, "num_classes": 10}),
    "alexnet": (63, {"widths": (8, 16, 16, 16, 16), "fc_features": 16, "num_classes": 10}),
}


def _zoo(family, lowrank, bn):
    """A small zoo model: the authors' ranks where the widths are the paper's, else rank 2."""
    size, kwargs = SMALL[family]
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    ranks = None
    if lowrank and kwargs:
        full = models.get_model(family, bn=bn, **kwargs)
        ranks = {s.path: 2 for s in surgery.find_convs(full, x, train=False) if s.candidate}
    model = models.get_model(family, lowrank=lowrank, bn=bn, ranks=ranks, **kwargs)
    return model, x


def _custom_rules(jaxpr: str) -> set[str]:
    """Names of the custom_vjp/custom_jvp rules in a jaxpr, except jax.nn's own (relu is a
    custom_jvp in JAX itself)."""
    found = set(re.findall(r"(custom_[jv]jp)_call\[\s*name=(\w+)", jaxpr))
    return {f"{kind}:{name}" for kind, name in found if name != "relu"}


def _train_step_jaxpr(model, x):
    tx = optax.sgd(0.1, momentum=0.9)
    state = jax.eval_shape(lambda: train.create_train_state(model, tx, x.shape[1:], 0))
    batch = {"image": x, "label": jnp.zeros((x.shape[0],), jnp.int32)}
    metrics = train.zero_metrics(10)
    return str(jax.make_jaxpr(train.train_step)(state, batch, metrics))


@pytest.mark.parametrize("family,lowrank,bn", [
    pytest.param(family, lowrank, bn, marks=() if family in ("nin", "cnn") else pytest.mark.slow)
    for family in SMALL for lowrank, bn in ((False, False), (True, False), (True, True))
    # every family full and low-rank (AlexNet has no BN variant); low-rank without BN on NIN;
    # the default run takes NIN and the CIFAR CNN, the slow run the ImageNet families
    if (lowrank, bn) != (True, False) and not (family == "alexnet" and bn)
    or (lowrank, bn) == (True, False) and family in ("nin", "alexnet")])
def test_portable_zoo_train_step_has_no_custom_rules_and_forward_mode_works(family, lowrank, bn):
    model, x = _zoo(family, lowrank, bn)
    variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(1))
    with F.policy("portable"):
        jaxpr = _train_step_jaxpr(model, x)
        assert "custom_jvp_call" in jaxpr  # the check below sees custom rules (relu's)
        assert _custom_rules(jaxpr) == set()
        assert "select_and_scatter" in jaxpr  # nn.max_pool's own gradient
        # forward mode through the whole net, in the parameters and the input at once: a
        # custom_vjp anywhere would fail the trace; computed (and finite) for one family
        def jvp(v):
            return jax.jvp(model.apply, (v, x), (v, x))[1]

        tangent = jax.eval_shape(jvp, variables)
        assert tangent.shape == (2, model_classes(model))
        if (family, lowrank, bn) == ("nin", True, True):
            assert bool(jnp.all(jnp.isfinite(jax.jit(jvp)(variables))))


def model_classes(model):
    return getattr(model, "base", model).num_classes


@on_cpu
def test_auto_zoo_train_step_uses_the_cpu_formulations():
    model, x = _zoo("nin", True, False)
    jaxpr = _train_step_jaxpr(model, x)
    assert "custom_vjp:channel_matmul" in _custom_rules(jaxpr)  # pairs and 1x1 convs
    assert "select_and_scatter" not in jaxpr  # max pooling differentiated through slices


@pytest.mark.slow  # 9 s: two compiled train steps of the zoo's NIN
@pytest.mark.parametrize("family", ["nin"])  # 5x5 pairs, 1x1 convs, max and average pooling
def test_policies_give_the_same_train_step(family):
    model, x = _zoo(family, True, False)
    tx = optax.sgd(0.1, momentum=0.9)
    batch = {"image": x, "label": jnp.arange(x.shape[0], dtype=jnp.int32)}
    out = {}
    for name in ("cpu", "portable"):
        with F.policy(name):
            state = train.create_train_state(model, tx, x.shape[1:], 0)
            out[name] = jax.jit(train.train_step)(state, batch, train.zero_metrics(10))
    _close(out["cpu"][0].params, out["portable"][0].params, 1e-4)
    _close(out["cpu"][1], out["portable"][1], 1e-4)
