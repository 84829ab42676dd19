"""The benchmarks run end to end at smoke sizes (their figures are measured, not tested)."""

import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common, gpu_check, speed, train_throughput, xla_cpu_flags
from lrjax import timing


@pytest.mark.slow
def test_speed_benchmark_smoke(tmp_path):
    path = str(tmp_path / "speed.json")
    speed.main(["--preset", "smoke", "--json", path])
    result = json.load(open(path))
    nin = result["models"]["nin@4"]
    assert nin["theoretical_speedup"] == pytest.approx(1.773, abs=1e-3)
    assert [row["layer"] for row in nin["layers"]] == ["conv1", "conv2"]
    assert all(v > 0 for v in nin["median_s"].values())
    assert set(nin["speedups"]) >= {"lowrank forward", "lowrank forward_backward"}
    assert len(nin["times_s"]["lowrank forward_backward"]) == 1
    machine = result["machine"]  # versions and flags are recorded with every figure
    assert machine["versions"]["jax"] and "XLA_FLAGS" in machine["xla_flags"]
    assert machine["formulation_policy"] == "auto"


@pytest.mark.slow
def test_train_throughput_benchmark_smoke(tmp_path):
    pytest.importorskip("torch", reason="the PyTorch side of the comparison needs torch")
    path = str(tmp_path / "throughput.json")
    train_throughput.main(["--batch", "4", "--steps", "2", "--json", path])
    result = json.load(open(path))
    rows = result["models"]
    for name in ("nin", "lowrank_nin"):
        assert len(rows[name]["lrjax"]["step_s"]) == 2
        assert {"pytorch NCHW", "pytorch channels_last"} <= set(rows[name])
        assert rows[name]["lrjax_over_pytorch"] > 0
    assert result["lowrank_speedup_lrjax"] > 0


@pytest.mark.slow
def test_ablated_steps_compute_the_same_update():
    """Each ablation swaps a formulation for the XLA op it replaces: one train step from the same
    state and batch gives the same parameters and metrics."""
    import jax
    import numpy as np

    variants = {"auto": {}, "portable": {"policy": "portable"},
                **{f: {"ablate": f} for f in train_throughput.ABLATIONS}}
    carries = {k: train_throughput.jax_train_step(True, 4, **kw).carry  # after one step
               for k, kw in variants.items()}
    ref_state, ref_metrics = carries.pop("auto")
    for key, (state, metrics) in carries.items():
        for a, b in zip(jax.tree.leaves((state.params, metrics)),
                        jax.tree.leaves((ref_state.params, ref_metrics)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=key)


def test_interleaved_times_take_turns():
    order = []
    times = common.interleaved_times(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=3, warmup=1)
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_interleaved_times_settle_before_each_timed_call(monkeypatch):
    order = []
    monkeypatch.setattr(timing.time, "sleep", lambda s: order.append(s))
    common.interleaved_times({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                             rounds=2, warmup=1, settle_s=0.05)
    assert order == ["a", "b"] + [0.05, "a", 0.05, "b"] * 2


def test_interleaved_times_add_rounds_for_fast_calls():
    calls = {"fast": lambda: time.sleep(0.002), "slow": lambda: time.sleep(0.01)}
    times = common.interleaved_times(calls, rounds=2, min_time_s=0.02)
    # the fast call took >= 2 ms: at most ceil(0.02 / 0.002) = 10 rounds, and more than 2
    assert 2 < len(times["fast"]) == len(times["slow"]) <= 10
    capped = common.interleaved_times(calls, rounds=2, min_time_s=10.0, max_rounds=4)
    assert {k: len(v) for k, v in capped.items()} == {"fast": 4, "slow": 4}
    assert len(common.interleaved_times(calls, rounds=3)["fast"]) == 3  # default: as asked


def test_interleaved_times_in_bursts():
    order = []
    times = common.interleaved_times(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=2, warmup=1,
        burst=3, burst_warmup=1)
    assert order == ["a", "b"] + (["a"] * 4 + ["b"] * 4) * 2
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6}
    with pytest.raises(ValueError, match="burst must be >= 1 .* got 0, 0"):
        common.interleaved_times({"a": lambda: None}, rounds=1, burst=0)


def test_steady_times_pause_warm_up_then_time_a_burst(monkeypatch):
    order = []
    monkeypatch.setattr(timing.time, "sleep", lambda s: order.append(s))
    times = timing.steady_times({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                repeats=4)
    burst, warm = timing.STEADY_BURST, timing.STEADY_WARMUP
    rounds = -(-4 // burst)  # at least the calls asked for, in whole bursts
    assert order == ["a", "b"] + ([timing.SETTLE_S] + ["a"] * (warm + burst)
                                  + [timing.SETTLE_S] + ["b"] * (warm + burst)) * rounds
    assert {k: len(v) for k, v in times.items()} == {"a": rounds * burst, "b": rounds * burst}
    with pytest.raises(ValueError, match="repeats must be >= 1; got 0"):
        timing.steady_times({"a": lambda: None}, repeats=0)
    with pytest.raises(ValueError, match="rounds must be >= 1; got 0"):
        timing.interleaved_times({"a": lambda: None}, rounds=0)


def test_flag_sets_name_real_xla_flags():
    assert xla_cpu_flags.FLAG_SETS["YNN fusion off"] == "--xla_cpu_experimental_ynn_fusion_type="
    assert all(v == "" or v.startswith("--xla_") for v in xla_cpu_flags.FLAG_SETS.values())


def test_recommended_flags_respect_the_user(monkeypatch):
    import jax

    from lrjax import xla_flags

    jax.devices()  # JAX's backends run in this process, whichever test ran before this one
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert xla_flags.use_recommended_flags() == "--xla_force_host_platform_device_count=2"
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.delenv("LRJAX_XLA_FLAGS_SOURCE", raising=False)
    with pytest.warns(UserWarning, match="already running"):
        assert xla_flags.use_recommended_flags() == ""
    assert xla_flags.flags_in_effect() == {"XLA_FLAGS": None, "source": "unset"}


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    path = str(tmp_path / "gpu.json")
    gpu_check.main(["--models", "cnn,resnet50", "--batches", "cnn=4", "--dtypes", "float32",
                    "--resnet-batches", "1,2", "--resnet-size", "32", "--repeats", "1",
                    "--json", path])
    result = json.load(open(path))
    resnet, runs = result["runs"][:2], result["runs"][2:]
    assert [(r["policy"], r["dtype"]) for r in runs] == [("portable", "float32"),
                                                         ("cpu", "float32")]
    for r in runs:
        assert {"full train step", "lowrank train step"} <= set(r["median_s"])
        assert r["speedup_train_step"] > 0
    assert [(r["model"], r["batch"]) for r in resnet] == [("resnet50", 1), ("resnet50", 2)]
    for r in resnet:
        assert set(r["median_s"]) == {"full", *gpu_check.RESNET_RULES}
        for label in gpu_check.RESNET_RULES:  # whole-net 2x, as XLA's own count sees it
            assert r["theoretical_speedup"][label] >= 2.0
            assert r["xla_flops_speedup"][label] == pytest.approx(
                r["theoretical_speedup"][label], rel=0.02)
    assert result["machine"]["device_kind"]


@pytest.mark.slow
def test_runtimes_benchmark_smoke(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch", reason="the PyTorch contender needs torch")
    from benchmarks import runtimes

    monkeypatch.setattr(runtimes, "MIN_TIME_S", 0.0)  # one turn: one burst of timed calls
    result = runtimes.bench_net("nin", 2, ("jax", "onnxruntime", "pytorch"), 1, 2,
                                str(tmp_path), lambda s: None)
    med = result["median_s"]
    assert {len(v) for v in result["runs_s"].values()} == {timing.STEADY_BURST}
    assert {"jax | full", "jax | lowrank", "onnxruntime | full", "onnxruntime | lowrank"} <= \
        set(med)
    assert result["speedups"]["onnxruntime | lowrank"] > 0
    for label in ("full", "lowrank"):  # the profiler saw the convs of the call, not the warm-up
        b = result["onnxruntime_breakdown"][label]
        assert b["conv_ms"] > 0 and b["dense_ms"] == 0  # NIN has no dense layer
        assert b["total_ms"] == pytest.approx(b["conv_ms"] + b["dense_ms"] + b["other_ms"])
        assert len(b["conv_nodes_ms"]) == (9 if label == "full" else 11)  # two pairs
    head = runtimes.headline(result)
    lowrank = {k.split(" | ")[0]: v for k, v in med.items() if k.endswith("| lowrank")}
    assert head["fastest_lowrank_runtime"] == min(lowrank, key=lowrank.get)
    assert head["over_pytorch_full"] > 0  # torch is in requirements.txt (importorskip above)


@pytest.mark.slow
def test_runtimes_gated_smoke(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from benchmarks import runtimes

    monkeypatch.setattr(runtimes, "MIN_TIME_S", 0.0)

    result = runtimes.bench_gated("nin", 2, ("onnxruntime", "jax"), 1, 2, str(tmp_path),
                                  lambda s: None)
    assert set(result) == {"onnxruntime"}  # JAX's gate is '+measured' itself
    r = result["onnxruntime"]
    assert set(r["median_s"]) == {"full", "lowrank", "lowrank gated"}
    assert set(r["kept_full"]) <= {"conv1", "conv2"}
    assert r["speedup_gated"] == pytest.approx(r["median_s"]["full"]
                                               / r["median_s"]["lowrank gated"])


def test_modern_cnns_time_by_kind():
    """Each one-kind variant's saving, as fractions of the full net's time and multiply-adds."""
    from benchmarks import modern_cnns

    rows = {"batch1_jax": {"full_ms": 50.0, "speedup2_ms": 30.0, "speedup2_kxk_only_ms": 45.0,
                           "speedup2_1x1_only_ms": 40.0},
            "by_kind": {"speedup2": {"kxk": [60, 40], "1x1": [40, 20], "fixed": [0, 0]},
                        "speedup2_kxk_only": {"kxk": [60, 40], "1x1": [40, 40]},
                        "speedup2_1x1_only": {"kxk": [60, 60], "1x1": [40, 20]}}}
    out = modern_cnns.time_by_kind(rows, lambda line: None)["batch1_jax"]
    assert out["kxk"] == {"macs_saved_fraction": 0.2, "time_saved_fraction": 0.1,
                          "time_saved_ms": 5.0}
    assert out["1x1"]["macs_saved_fraction"] == 0.2 and out["1x1"]["time_saved_ms"] == 10.0


@pytest.mark.slow  # 13 s: two decompositions, six XLA counts, an ONNX export
def test_public_models_row_checks_the_report_against_xla_and_exports(tmp_path):
    """One row of ``benchmarks.public_models`` on a model with the same habit (``.item()`` in
    ``__call__``, the flag positional): the report is XLA's lowered ratio, the export is checked."""
    from benchmarks import public_models
    from tests.test_ported_models import CALIB, StochasticDepthNet, X

    model = StochasticDepthNet()
    variables = model.init({"params": jax.random.key(0)}, X, True)
    row = public_models.measure(model, variables, (X, True), CALIB, tmp_dir=str(tmp_path),
                                exporters=("onnx",))
    assert row["candidates_by_kind"] == {"kxk": 5, "dense": 7}
    assert row["full_rank_max_error"] <= 1e-4 * row["output_scale"]
    for method in ("data-free", "calibrated"):
        assert row[method]["report_speedup"] == pytest.approx(
            row[method]["xla_lowered_speedup"], rel=1e-9)
        assert row[method]["report_speedup"] >= 2.0 and row[method]["layers_split"] >= 2
    assert row["onnx"]["batches"] == [2, 3] and row["onnx"]["max_abs_error"] < 1e-4
    with pytest.raises(SystemExit):
        public_models.main(["--jax-models", str(tmp_path)])  # no checkout there: exit 2


class Resized(nn.Module):
    """Segmentation nets' habit (NobuoTsukamoto/jax_examples' DABNet, LEDNet, Fast-SCNN): a
    ``jax.image.resize``, whose interpolation weights are work on constants."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = jax.image.resize(x, (x.shape[0], 12, 12, 16), "bilinear")
        return nn.Conv(8, (3, 3))(x)


def test_public_models_xla_count_is_the_models_own_jit():
    """The benchmarks' XLA count is ``jax.jit``'s, work on constants included (as lrjax's report
    counts it): under ``compile_time_constants`` for every model it left out the resize's
    weights, and a report equal to XLA's lowered ratio read as 0.14% off."""
    import lrjax
    from benchmarks import public_models

    model, x = Resized(), jnp.asarray(np.random.RandomState(0).normal(size=(2, 8, 8, 4)),
                                      jnp.float32)
    variables = model.init(jax.random.key(0), x)
    own = jax.jit(model.apply).lower(variables, x).cost_analysis()["flops"]
    assert public_models.xla_flops(model, variables, (x,), False) == own
    result = lrjax.decompose_linen(model, variables, x, rule="speedup:1.5")
    assert result.report.speedup == pytest.approx(
        own / public_models.xla_flops(result.module, result.variables, (x,), False), rel=1e-9)


class TwoInputs(nn.Module):
    """A score model's call: images and noise levels, ``train`` a keyword; an attention-style
    dense layer written by hand (``W`` and ``b``, as score_sde's ``NIN``)."""

    @nn.compact
    def __call__(self, x, sigmas, train=True):
        temb = nn.Dense(8)(jnp.stack([jnp.sin(sigmas), jnp.cos(sigmas)], -1))
        h = nn.swish(nn.Conv(8, (3, 3))(x) + temb[:, None, None, :])
        w = self.param("W", nn.initializers.lecun_normal(), (8, 8))
        h = h + jnp.einsum("bhwc,cn->bhwn", h, w)
        h = nn.Dropout(0.1, deterministic=not train)(nn.Conv(16, (3, 3), strides=2)(h))
        return nn.Conv(3, (1, 1))(nn.swish(h))


@pytest.mark.slow  # 10 s: two decompositions, six XLA counts, an ONNX export
def test_score_sde_row_checks_the_report_against_xla_and_exports(tmp_path):
    """One row of ``benchmarks.score_sde`` on a model called as score_sde's are (two arrays,
    ``train=False``): the report is XLA's lowered ratio, the own product a layer, the export
    of both inputs checked; no checkout: one error line."""
    from benchmarks import score_sde

    model = TwoInputs()
    x, sigmas = jax.random.normal(jax.random.key(0), (2, 16, 16, 3)), jnp.array([0.5, 3.0])
    calibration = (jax.random.normal(jax.random.key(1), (8, 16, 16, 3)), jnp.linspace(0.5, 5, 8))
    variables = model.init(jax.random.key(2), x, sigmas, train=False)
    row = score_sde.measure(model, variables, (x, sigmas), calibration, tmp_dir=str(tmp_path),
                            exporters=("onnx",))
    assert row["candidates_by_kind"] == {"kxk": 2, "1x1": 1, "dense": 2}
    assert row["left_as_is"] == []  # the hand-written product feeding a conv: a layer too
    assert row["full_rank_max_error"] <= 1e-4 * row["output_scale"]
    for method in ("data-free", "calibrated"):
        assert row[method]["report_speedup"] == pytest.approx(
            row[method]["xla_lowered_speedup"], rel=1e-9)
        assert row[method]["report_speedup"] >= 1.99
    assert row["onnx"]["batches"] == [2, 3] and row["onnx"]["max_abs_error"] < 1e-4
    with pytest.raises(SystemExit):
        score_sde.main(["--score-sde", str(tmp_path)])  # no checkout there: exit 2


@pytest.mark.slow  # 8 s: two decompositions, four XLA counts, two exports
def test_bonsai_llms_row_checks_the_report_against_xla_and_exports(tmp_path):
    """One row of ``benchmarks.bonsai_llms`` on an NNX model updating a cache passed as a keyword
    (made afresh for each call): the report is XLA's lowered ratio, the exports are checked."""
    from flax import nnx

    from benchmarks import bonsai_llms
    from tests.test_model_patterns import _Cached, _Memory

    x = jax.random.normal(jax.random.key(0), (4, 8))
    row = bonsai_llms.measure(_Cached(nnx.Rngs(0)), (x,), lambda: {"memory": _Memory()}, [x],
                              tmp_dir=str(tmp_path), rule="speedup:1.5",
                              exporters=("onnx", "stablehlo"))
    calibrated = row["calibrated"]
    assert calibrated["report_speedup"] >= 1.5 and calibrated["layers_split"] >= 1
    # (XLA counts this toy's 2,360 flops per example 8 fewer than lrjax, in both nets: the
    # element-wise work of its cache update, fixed cost)
    assert calibrated["report_speedup"] == pytest.approx(calibrated["xla_lowered_speedup"],
                                                         rel=0.005)
    for fmt in ("onnx", "stablehlo"):
        assert row[fmt]["max_abs_error"] <= 1e-5 + 1e-4 * row[fmt]["scale"]
    with pytest.raises(SystemExit):
        bonsai_llms.main(["--bonsai", str(tmp_path)])  # no checkout there: exit 2


def test_perch_models_needs_its_checkout_and_counts_every_float_output(tmp_path):
    """``benchmarks.perch_models`` refuses a folder without perch's ``chirp/models`` (one
    ``error:`` line, exit 2); a row's error covers every floating-point output of a model that
    returns a dict (perch's classifiers) or a list, not its integer ones."""
    from benchmarks import perch_models, public_models

    with pytest.raises(SystemExit) as stop:
        perch_models.main(["--perch", str(tmp_path)])
    assert stop.value.code == 2
    outputs = {"label": jnp.ones(2), "embedding": [jnp.zeros((2, 3)), jnp.arange(3)]}
    assert [a.shape for a in public_models._floats(outputs)] == [(2, 3), (2,)]


def test_octo_models_needs_its_checkout_and_a_positive_step_count(tmp_path, capsys):
    """``benchmarks.octo_models`` refuses a folder without Octo's ``octo_module.py`` and a
    non-positive ``--diffusion-steps`` (one ``error:`` line each, exit 2)."""
    from benchmarks import octo_models

    with pytest.raises(SystemExit) as stop:
        octo_models.main(["--octo", str(tmp_path)])
    assert stop.value.code == 2 and "no octo/model/octo_module.py there" in capsys.readouterr().err
    (tmp_path / "octo" / "model").mkdir(parents=True)
    (tmp_path / "octo" / "model" / "octo_module.py").write_text("")
    with pytest.raises(SystemExit) as stop:
        octo_models.main(["--octo", str(tmp_path), "--diffusion-steps", "0"])
    assert stop.value.code == 2 and "--diffusion-steps must be at least 1" in \
        capsys.readouterr().err


def test_vocoder_models_needs_its_checkout(tmp_path, capsys):
    """``benchmarks.vocoder_models`` refuses a folder without the vocoder's ``models.py`` (one
    ``error:`` line, exit 2)."""
    from benchmarks import vocoder_models

    with pytest.raises(SystemExit) as stop:
        vocoder_models.main(["--nsf", str(tmp_path)])
    assert stop.value.code == 2 and "no models.py there" in capsys.readouterr().err


def test_a_row_counts_and_checks_the_layers_under_weight_wrappers():
    """A model's layers under ``nn.WeightNorm`` are its candidates (folded), checked at full
    rank with the others."""
    from benchmarks import public_models

    class Wrapped(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.WeightNorm(nn.Conv(16, (3, 3)))(x))
            return nn.Conv(16, (3, 3))(x)

    model, x = Wrapped(), jnp.ones((2, 8, 8, 4)) * jnp.arange(4)
    variables = model.init(jax.random.key(0), x)

    def flops(m, v, compiled):
        lowered = jax.jit(m.apply).lower(v, x)
        return (lowered.compile() if compiled else lowered).cost_analysis()["flops"]

    row = public_models.decomposition_row(model, variables, (x,), x, flops)
    assert row["candidates_by_kind"] == {"kxk": 2} and row["full_rank_max_error"] < 1e-4
    assert row["data-free"]["report_speedup"] == pytest.approx(
        row["data-free"]["xla_lowered_speedup"], rel=0.01)
