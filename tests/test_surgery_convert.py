"""Model surgery on the zoo, rank rules, checkpoint files and the convert command line."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax import checkpoint, cost_report, costs, decompose, models, rules, runtimes, surgery, timing
from lrjax.cli import convert as convert_cli
from tests.helpers import apply, init

SMALL = {
    "vgg16": dict(widths=((8, 8), (16, 16), (16, 16, 16), (16, 16, 16), (16, 16, 16)),
                  fc_features=32, num_classes=10),
    "caffenet": dict(widths=(16, 32, 32, 32, 32), fc_features=32, num_classes=10),
    "alexnet": dict(widths=(16, 32, 32, 32, 32), fc_features=32, num_classes=10),
}


def _setup(family, bn=False):
    kwargs = SMALL.get(family, {})
    size = 32 if family == "vgg16" else models.model_spec(family).image_size
    full = models.get_model(family, bn=bn, **kwargs)
    return kwargs, size, full, _perturbed(models.init_variables(full, size))


@jax.jit
def _perturbed(variables):
    """Non-trivial biases and BN statistics (positive where 1-D, as variances must be); jitted:
    one compile per model instead of one per operation and shape."""
    variables = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(5), a.shape),
                             variables)
    return jax.tree.map(lambda a: jnp.abs(a) if a.ndim == 1 else a, variables)


def _problem(full, variables, size, **kw):
    x = cost_report.images(1, size)
    return surgery.rank_problem(full, variables, (x,), {"train": False}, **kw)


@pytest.mark.parametrize("family,bn", [  # (the NIN, with its batch norms, and ImageNet's: the slow run)
    pytest.param("nin", True, marks=pytest.mark.slow), ("cnn", False),
    pytest.param("vgg16", False, marks=pytest.mark.slow),
    pytest.param("caffenet", True, marks=pytest.mark.slow)])
def test_full_rank_surgery_gives_original_logits(family, bn):
    _, size, full, variables = _setup(family, bn)
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    top = {s.path: decompose.max_rank(s.shape.kernel_shape, groups=s.shape.groups)
           for s in surgery.find_convs(full, x, train=False) if s.candidate}
    result = surgery.decompose_linen(full, variables, x, rule=top, train=False)
    want = apply(full, variables, x)
    got = apply(result.module, result.variables, x)
    np.testing.assert_allclose(got, want, atol=2e-4 * float(jnp.abs(want).max()) + 1e-5)
    assert set(result.report.errors) == set(top)
    assert all(err < 1e-5 for err in result.report.errors.values())
    assert result.module.base is full


@pytest.mark.parametrize("family", [  # (CaffeNet, AlexNet, VGG-16, the ImageNet ones: slow run)
    pytest.param(f, marks=pytest.mark.slow) if f in ("caffenet", "alexnet", "vgg16") else f
    for f in models.MODELS])
def test_surgery_then_forward_for_every_zoo_model(family):
    kwargs, size, full, variables = _setup(family)
    spec = models.model_spec(family)
    # the authors' ranks exceed shrunk widths; alexnet has none
    rule = "speedup:2" if family in SMALL else spec.ranks
    x = jnp.ones((2, size, size, 3))
    result = surgery.decompose_linen(full, variables, x, rule=rule, train=False)
    logits = apply(result.module, result.variables, x)
    assert logits.shape == (2, kwargs.get("num_classes", spec.num_classes))
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert set(result.report.errors) == set(result.ranks) and result.ranks
    # the report's speedup is the wrapped module's own cost report
    own = cost_report.cost_report(result.module, cost_report.images(1, size), train=False,
                                  dense=True)
    assert result.report.net.speedup == pytest.approx(own.speedup)
    assert own.speedup >= (2.0 if family in SMALL else 1.5)


def test_output_error_tracks_kernel_error():
    x = jax.random.normal(jax.random.key(0), (4, 24, 24, 16))
    conv = nn.Conv(32, (3, 3), use_bias=False)
    cv = init(conv, 1, x)
    ref = conv.apply(cv, x)
    for rank in (4, 16, 32, 47):
        v, h = decompose.vh_decompose(cv["params"]["kernel"], rank)
        w_k = decompose.reconstruct(v, h)
        kernel_err = float(decompose.relative_error(cv["params"]["kernel"], w_k))
        out = conv.apply({"params": {"kernel": w_k}}, x)
        out_err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        # white input: output error ~ kernel error (borders and finite samples aside)
        assert out_err == pytest.approx(kernel_err, rel=0.15)


class FoldNet(nn.Module):
    with_bn: bool = True

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(8, (3, 3), name="conv1")(x)
        if self.with_bn:
            x = nn.BatchNorm(use_running_average=not train, name="bn1")(x)
        return jnp.mean(nn.relu(x), axis=(1, 2))


def test_fold_batch_norms_then_decompose():
    net = FoldNet()
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    variables = init(net, 1, x)
    variables = jax.jit(lambda v: jax.tree.map(
        lambda a: a + jnp.abs(jax.random.normal(jax.random.key(2), a.shape)), v))(variables)
    folded = surgery.fold_batch_norms(variables, {"conv1": "bn1"})
    assert set(folded) == {"params"} and set(folded["params"]) == {"conv1"}
    plain = FoldNet(with_bn=False)
    np.testing.assert_allclose(apply(plain, folded, x), apply(net, variables, x), atol=1e-4)
    result = surgery.decompose_linen(plain, folded, x, rule={"conv1": 9})  # full rank
    np.testing.assert_allclose(apply(result.module, result.variables, x), apply(net, variables, x),
                               atol=1e-4)
    with pytest.raises(ValueError, match="bn9/mean is missing"):
        surgery.fold_batch_norms(variables, {"conv1": "bn9"})
    with pytest.raises(ValueError, match="do not match the model"):
        surgery.decompose_linen(plain, variables, x, rule={"conv1": 4})  # bn1 left over


def test_surgery_rejects_mismatched_variables():
    _, size, full, variables = _setup("nin")
    x = cost_report.images(1, size)
    bad = jax.tree.map(lambda a: a, variables)
    bad["params"]["conv2"]["kernel"] = jnp.zeros((5, 5, 96, 100))
    with pytest.raises(ValueError, match=r"conv2/kernel \(5, 5, 96, 100\) \(expected"):
        surgery.decompose_linen(full, bad, x, rule="nin", train=False)
    del bad["params"]["cccp1"]
    with pytest.raises(ValueError, match=r"missing: \['params/cccp1/bias'"):
        surgery.check_variables(full, bad, x, train=False)


def test_rank_rules(monkeypatch):
    _, size, full, variables = _setup("nin")
    problem = _problem(full, variables, size)
    assert rules.select_ranks("nin", problem) == {"conv1": 10, "conv2": 51}
    energy = rules.select_ranks("energy:0.9", problem)  # every conv, 1x1s (cccp*) included
    assert set(energy) == {"conv1", "conv2", "conv3", *(f"cccp{i}" for i in range(1, 7))}
    problem8 = _problem(full, variables, size, multiple=8)
    speed = rules.select_ranks("speedup:1.6", problem8)
    assert all(r is None or r % 8 == 0 or r == 15 for r in speed.values())  # 15: conv1's top
    net = cost_report.cost_report(full, cost_report.images(1, size), ranks=speed, train=False)
    assert net.speedup >= 1.6  # over every conv of the net, 1x1s included
    assert rules.select_ranks({"conv1": 15, "conv2": None}, problem) == \
        {"conv1": 15, "conv2": None}
    rounded = rules.select_ranks({"conv2": 51}, problem8)
    assert rounded == {"conv2": 48}
    for rule, match in [
        ({"conv9": 3}, r"unknown layers \['conv9'\]; the model's decomposable layers are "
                       r"\['cccp1', 'cccp2', .*'conv3'\]"),
        ({"cccp1": 200}, r"rank 200 is invalid for layer 'cccp1': out of range \[1, 160\]"),
        ("energy:lots", "must be followed by a number"),
        ("energy:1.5", r"must be in \(0, 1\]"),
        ({"conv1": 999}, "rank 999 is invalid for layer 'conv1'"),
        ("speedup:100", "out of reach"),
        ("speedup:1", r"the target speedup must be > 1"),
        ("speedup:0.5", r"the target speedup must be > 1"),
        ("speedupp:2", "unknown rule kind 'speedupp:'"),
        ("nin,multiple=0", "multiple must be a positive int; got 0"),
        ("nin,colour=red", "option 'colour=red' is not one of"),
        ("measured", "gates another rule"),
        (3.5, "unknown rank rule"),
    ]:
        with pytest.raises(ValueError, match=match):
            rules.select_ranks(rule, problem)


def test_measured_gate_keeps_the_slower_pairs_full(monkeypatch):
    _, size, full, variables = _setup("nin")
    problem = _problem(full, variables, size)
    seen = {}

    calls = []
    made = []
    monkeypatch.setattr(runtimes, "layer_call", lambda name: made.append(name) or name)

    def fake_layer_times(layers, ranks, **kwargs):  # conv1's pair slower, conv2's faster
        seen.update(ranks)
        calls.append(kwargs["call"])
        return {"conv1": (1.0, 2.0), "conv2": (3.0, 1.0)}

    monkeypatch.setattr(timing, "layer_times", fake_layer_times)
    assert rules.select_ranks("nin+measured", problem) == {"conv1": None, "conv2": 51}
    assert seen == {"conv1": 10, "conv2": 51}
    assert calls == [None]  # timed in JAX
    assert rules.select_ranks("nin+measured:onnxruntime", problem) == {"conv1": None,
                                                                         "conv2": 51}
    assert made == ["onnxruntime"] and calls == [None, "onnxruntime"]
    with pytest.raises(ValueError, match=r"'\+measured:tvm' is not '\+measured' or"):
        rules.select_ranks("nin+measured:tvm", problem)


@pytest.mark.parametrize("runtime", ["jax", "onnxruntime",
                                     pytest.param("litert", marks=pytest.mark.slow)])
def test_layer_times_in_each_runtime(runtime, monkeypatch):
    if runtime != "jax":
        pytest.importorskip("onnxruntime" if runtime == "onnxruntime" else "ai_edge_litert")
    layer = costs.ConvShape("conv", in_channels=8, out_channels=16, kernel_size=(3, 3),
                            input_hw=(12, 12), padding=((1, 1), (1, 1)))
    counts = []
    steady_times = timing.steady_times

    def counted(calls, repeats, **kwargs):  # the full conv and its pair, timed in steady state
        times = steady_times(calls, repeats, **kwargs)
        counts.append({k: len(v) for k, v in times.items()})
        return times

    monkeypatch.setattr(timing, "steady_times", counted)
    call = None if runtime == "jax" else runtimes.layer_call(runtime)
    times = timing.layer_times([layer], {"conv": 4}, batch=2, repeats=2, call=call,
                               min_time_s=0.0)
    full, pair = times["conv"]
    assert 0 < full < 1 and 0 < pair < 1
    assert counts == [{None: timing.STEADY_BURST, 4: timing.STEADY_BURST}]
    with pytest.raises(ValueError, match="unknown runtime 'tvm'"):
        rules.measured_gate([layer], {"conv": 4}, runtime="tvm")
    if runtime == "jax":
        full, pair = timing.layer_times([layer], {"conv": 4}, repeats=1, backward=True,
                                        min_time_s=0.0)["conv"]
        assert 0 < full < 1 and 0 < pair < 1
    else:
        with pytest.raises(ValueError, match="backward timings run in JAX only"):
            timing.layer_times([layer], {"conv": 4}, call=call, backward=True)


@pytest.mark.parametrize("fmt", ["npz", "orbax"])
def test_checkpoint_roundtrip(tmp_path, fmt):
    _, _, _, variables = _setup("nin", bn=True)
    path = str(tmp_path / ("v.npz" if fmt == "npz" else "v"))
    checkpoint.save_variables(path, variables)
    back = checkpoint.load_variables(path)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(checkpoint.CheckpointError, match="exists"):
        checkpoint.save_variables(path, variables)
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]


def test_load_variables_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load_variables(str(tmp_path / "none.npz"))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable .npz"):
        checkpoint.load_variables(str(junk))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="not an Orbax variables checkpoint"):
        checkpoint.load_variables(str(tmp_path / "emptydir"))


def test_convert_cli_end_to_end(tmp_path, capsys):
    _, _, _, variables = _setup("nin")
    src = str(tmp_path / "nin.npz")
    checkpoint.save_variables(src, variables)
    out = str(tmp_path / "lowrank")
    report = str(tmp_path / "report.json")
    rc = convert_cli.main(["--model", "nin", "--checkpoint", src, "--ranks", "nin", "--output", out,
                       "--json", report])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "conv2" in printed and "1.77x" in printed
    new = checkpoint.load_variables(out)
    data = json.load(open(report))
    assert data["ranks"] == {"conv1": 10, "conv2": 51}
    assert data["macs_speedup"] == pytest.approx(1.773, abs=1e-3)
    # XLA's flop ratio: the element-wise work (biases, ReLUs, pooling) is fixed cost
    assert data["theoretical_speedup"] == pytest.approx(1.767, abs=1e-3)
    lowrank = models.get_model("nin", ranks=data["ranks"])
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    full = models.get_model("nin")
    logits = lowrank.apply(new, x)
    assert logits.shape == (2, 10)
    # the converted model stays close to the original (these random weights: 55% / 86% error)
    assert float(jnp.linalg.norm(logits - apply(full, variables, x))) < \
        float(jnp.linalg.norm(apply(full, variables, x)))
    # rank file naming unknown layers, wrong model, mismatched checkpoint: message, nothing written
    rank_file = tmp_path / "bad_ranks.json"
    rank_file.write_text(json.dumps({"conv1": 4, "conv7": 3}))
    for argv, match in [
        (["--model", "nin", "--ranks", str(rank_file)], "unknown layers"),
        (["--model", "resnet", "--ranks", "nin"], "unknown model 'resnet'"),
        (["--model", "cnn", "--ranks", "cnn"], "variables do not match the model"),
        (["--model", "nin", "--ranks", "nin", "--fold-bn", "conv1"], "--fold-bn must look like"),
        (["--model", "nin", "--ranks", "nin", "--fold-bn", "conv1:bn1"], "needs the BN variant"),
    ]:
        target = str(tmp_path / "should_not_exist.npz")
        rc = convert_cli.main(argv + ["--checkpoint", src, "--output", target])
        assert rc == 2
        assert match in capsys.readouterr().err
        assert not os.path.exists(target)


def test_convert_folds_batch_norms(tmp_path):
    _, _, full_bn, variables = _setup("nin", bn=True)
    src = str(tmp_path / "nin_bn.npz")
    checkpoint.save_variables(src, variables)
    out = str(tmp_path / "folded.npz")
    rank_file = tmp_path / "full.json"
    rank_file.write_text(json.dumps({"conv1": 15}))
    assert convert_cli.main(["--model", "nin", "--bn", "--checkpoint", src, "--ranks",
                         str(rank_file), "--output", out,
                         "--fold-bn", "conv1:bn1,cccp2:bn2,conv3:bn3,cccp5:bn4"]) == 0
    new = checkpoint.load_variables(out)
    assert "batch_stats" not in new
    lowrank = models.get_model("nin", ranks={"conv1": 15})  # full rank: exact
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    want = apply(full_bn, variables, x)
    np.testing.assert_allclose(lowrank.apply(new, x), want,
                               atol=1e-4 * float(jnp.abs(want).max()) + 1e-5)


def test_measured_speedup_reallocates_the_budget_to_the_faster_pairs(monkeypatch):
    """'speedup:S+measured': a layer whose pair saves too little time stays full and the budget
    goes to the others, so the whole-net target still holds; every (layer, rank) is timed
    once."""
    _, size, full, variables = _setup("nin")
    problem = _problem(full, variables, size)
    plain = rules.select_ranks("speedup:1.5", problem)
    slow = max((p for p, r in plain.items() if r is not None),
               key=lambda p: costs.conv_cost(problem.site(p).shape).macs)
    timed = []

    def fake_layer_times(layers, ranks, **kwargs):  # the biggest layer's pair: 3% faster
        timed.extend(ranks.items())
        return {p: (1.0, 0.97 if p == slow else 0.5) for p in ranks}

    monkeypatch.setattr(timing, "layer_times", fake_layer_times)
    kept = {}
    gated = rules.select_ranks("speedup:1.5+measured", problem, measure_batch=4, kept_full=kept)
    assert gated[slow] is None and "saved 3% of the layer's time" in kept[slow] \
        and "timed in jax at batch 4" in kept[slow]
    assert problem.full_macs / problem.macs_after(gated) >= 1.5  # the target still holds
    assert {p for p, r in gated.items() if r is not None} - {slow} and \
        any(gated[p] != plain[p] for p in gated if p != slow)  # others cut deeper
    assert len(timed) == len(set(timed))  # each (layer, rank) timed once
    assert all((p, r) in timed for p, r in gated.items() if r is not None)
    # every pair slower: gating them all puts the target out of reach, so the pairs that
    # returned the most are let back in until it holds
    monkeypatch.setattr(timing, "layer_times", lambda layers, ranks, **kw: {
        p: (1.0, 2.0 if p == slow else 1.5) for p in ranks})
    kept = {}
    gated = rules.select_ranks("speedup:1.5+measured", problem, kept_full=kept)
    assert problem.full_macs / problem.macs_after(gated) >= 1.5
    assert gated[slow] is None and slow in kept  # the worst return is the one kept full
    with pytest.raises(ValueError, match="out of reach"):  # the rule itself still can be
        rules.select_ranks("speedup:100+measured", problem)
