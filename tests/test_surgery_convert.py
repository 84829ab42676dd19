"""Model surgery, rank rules, checkpoint files and the convert command line."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrjax import checkpoint, convert, decompose, models, surgery
from lrjax.cost_report import conv_layers
from lrjax.layers import ConvFactory, full_rank, low_rank

SMALL = {
    "vgg16": dict(widths=((8, 8), (16, 16), (16, 16, 16), (16, 16, 16), (16, 16, 16)),
                  fc_features=32, num_classes=10),
    "caffenet": dict(widths=(16, 32, 32, 32, 32), fc_features=32, num_classes=10),
}


def _setup(name, size=None):
    base = name.replace("lowrank_", "")
    kwargs = SMALL.get(base.replace("_bn", ""), {})
    size = size or (32 if base.startswith("vgg") else models.model_spec(name).image_size)
    full = models.get_model(base, **kwargs)
    variables = models.init_variables(full, size)
    variables = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(5), a.shape),
                             variables)  # non-trivial biases and BN statistics
    variables = jax.tree.map(lambda a: jnp.abs(a) if a.ndim == 1 else a, variables)
    return base, kwargs, size, full, variables


def _full_ranks(model, size):
    return {layer.shape.name: decompose.max_rank(layer.shape.kernel_shape,
                                                 groups=layer.shape.groups)
            for layer in conv_layers(model, (1, size, size, 3))
            if layer.shape.kernel_size != (1, 1)}


@pytest.mark.parametrize("name", ["nin", "nin_bn", "cnn", "vgg16", "caffenet", "caffenet_bn"])
def test_full_rank_surgery_gives_original_logits(name):
    base, kwargs, size, full, variables = _setup(name)
    lowrank = models.get_model(base, ranks=_full_ranks(full, size), **kwargs)
    new, report = surgery.to_lowrank(variables, lowrank, (1, size, size, 3))
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    want = full.apply(variables, x)
    got = lowrank.apply(new, x)
    np.testing.assert_allclose(got, want, atol=2e-4 * float(jnp.abs(want).max()) + 1e-5)
    assert all(err < 1e-5 for err in report.errors.values())


@pytest.mark.parametrize("name", list(models.MODELS))
def test_surgery_then_forward_for_every_zoo_model(name):
    base, kwargs, size, full, variables = _setup(name)
    spec = models.model_spec(name)
    shrunk = base.replace("_bn", "") in SMALL  # the authors' ranks exceed the shrunk widths
    rule = "energy:0.6" if shrunk or spec.ranks is None else spec.ranks
    ranks = surgery.select_ranks(rule, full, variables, (1, size, size, 3))
    lowrank = models.get_model(base, ranks=ranks, **kwargs)
    new, report = surgery.to_lowrank(variables, lowrank, (1, size, size, 3))
    logits = lowrank.apply(new, jnp.ones((2, size, size, 3)))
    assert logits.shape == (2, kwargs.get("num_classes", spec.num_classes))
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert report.net.speedup > 0 and set(report.errors) == set(ranks)


def test_output_error_tracks_kernel_error():
    x = jax.random.normal(jax.random.key(0), (4, 24, 24, 16))
    conv = nn.Conv(32, (3, 3), use_bias=False)
    cv = conv.init(jax.random.key(1), x)
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
    conv: ConvFactory = full_rank()
    with_bn: bool = True

    @nn.compact
    def __call__(self, x, train=False):
        x = self.conv(8, (3, 3), name="conv1")(x)
        if self.with_bn:
            x = nn.BatchNorm(use_running_average=not train, name="bn1")(x)
        return jnp.mean(nn.relu(x), axis=(1, 2))


def test_fold_batch_norm_surgery():
    net = FoldNet()
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    variables = net.init(jax.random.key(1), x)
    variables = jax.tree.map(lambda a: a + jnp.abs(jax.random.normal(jax.random.key(2), a.shape)),
                             variables)
    target = FoldNet(conv=low_rank({"conv1": 9}), with_bn=False)  # full rank
    new, _ = surgery.to_lowrank(variables, target, x.shape, fold_bn={"conv1": "bn1"})
    np.testing.assert_allclose(target.apply(new, x), net.apply(variables, x), atol=1e-4)
    with pytest.raises(ValueError, match="unexpected variables"):
        surgery.to_lowrank(variables, target, x.shape)


def test_surgery_rejects_mismatched_variables():
    _, _, size, full, variables = _setup("nin")
    lowrank = models.get_model("lowrank_nin")
    bad = jax.tree.map(lambda a: a, variables)
    bad["params"]["conv2"]["kernel"] = jnp.zeros((5, 5, 96, 100))
    with pytest.raises(ValueError, match=r"conv2/kernel has shape \(5, 5, 96, 100\)"):
        surgery.to_lowrank(bad, lowrank, (1, 32, 32, 3))
    del bad["params"]["cccp1"]
    with pytest.raises(ValueError, match=r"missing: \['params/cccp1/bias'"):
        surgery.check_variables(full, bad, (1, 32, 32, 3))


def test_rank_rules():
    _, _, size, full, variables = _setup("nin")
    shape = (1, size, size, 3)
    assert surgery.select_ranks("nin", full, variables, shape) == {"conv1": 10, "conv2": 51}
    energy = surgery.select_ranks("energy:0.9", full, variables, shape)
    assert set(energy) == {"conv1", "conv2", "conv3"}
    speed = surgery.select_ranks("speedup:2.0", full, variables, shape, multiple=8)
    lowrank = models.get_model("nin", ranks=speed)
    layers = conv_layers(lowrank, shape)
    from lrjax import costs
    decomposed = [layer.shape for layer in layers if layer.shape.kernel_size != (1, 1)]
    net = costs.net_cost(decomposed, speed)
    assert net.speedup >= 2.0
    gated = surgery.select_ranks({"conv1": 15, "conv2": 51}, full, variables, shape)
    assert gated == {"conv1": 15, "conv2": 51}
    measured = surgery.select_ranks("nin+measured", full, variables, shape)
    assert set(measured) == {"conv1", "conv2"}
    assert all(r in (None, {"conv1": 10, "conv2": 51}[n]) for n, r in measured.items())
    with pytest.raises(ValueError, match=r"unknown layers \['conv9'\]"):
        surgery.select_ranks({"conv9": 3}, full, variables, shape)
    with pytest.raises(ValueError, match="must be followed by a number"):
        surgery.select_ranks("energy:lots", full, variables, shape)
    with pytest.raises(ValueError, match="rank 999 is invalid for layer 'conv1'"):
        surgery.select_ranks({"conv1": 999}, full, variables, shape)


@pytest.mark.parametrize("fmt", ["npz", "orbax"])
def test_checkpoint_roundtrip(tmp_path, fmt):
    _, _, _, _, variables = _setup("nin_bn")
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
    _, _, _, full, variables = _setup("nin")
    src = str(tmp_path / "nin.npz")
    checkpoint.save_variables(src, variables)
    out = str(tmp_path / "lowrank")
    report = str(tmp_path / "report.json")
    rc = convert.main(["--model", "nin", "--checkpoint", src, "--ranks", "nin", "--output", out,
                       "--json", report])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "conv2" in printed and "1.88x" in printed
    new = checkpoint.load_variables(out)
    lowrank = models.get_model("lowrank_nin")
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    assert lowrank.apply(new, x).shape == (2, 10)
    data = json.load(open(report))
    assert data["ranks"] == {"conv1": 10, "conv2": 51}
    assert data["theoretical_speedup"] == pytest.approx(1.877, abs=1e-3)
    # rank file naming unknown layers, wrong model, mismatched checkpoint: message, nothing written
    rank_file = tmp_path / "bad_ranks.json"
    rank_file.write_text(json.dumps({"conv1": 4, "conv7": 3}))
    for argv, match in [
        (["--model", "nin", "--ranks", str(rank_file)], "unknown layers"),
        (["--model", "resnet", "--ranks", "nin"], "unknown model 'resnet'"),
        (["--model", "cnn", "--ranks", "cnn"], "checkpoint does not match the model"),
        (["--model", "lowrank_nin", "--ranks", "nin"], "did you mean 'nin'"),
    ]:
        target = str(tmp_path / "should_not_exist.npz")
        rc = convert.main(argv + ["--checkpoint", src, "--output", target])
        assert rc == 2
        assert match in capsys.readouterr().err
        assert not os.path.exists(target)
