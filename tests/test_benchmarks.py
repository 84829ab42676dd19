"""The benchmarks run end to end at smoke sizes (their figures are measured, not tested)."""

import json

from benchmarks import speed, train_throughput


def test_speed_benchmark_smoke(tmp_path):
    path = str(tmp_path / "speed.json")
    results = speed.main(["--preset", "smoke", "--json", path])
    nin = json.load(open(path))["models"]["nin"]
    assert set(nin["variants"]) == {"full", "lowrank (plain pairs)", "+ measured gating",
                                    "+ per-layer formulation"}
    assert nin["theoretical_speedup"] > 1.8
    assert [row["layer"] for row in nin["layers"]] == ["conv1", "conv2"]
    assert results["models"]["nin"]["variants"]["full"]["forward_s"] > 0


def test_train_throughput_benchmark_smoke(tmp_path):
    path = str(tmp_path / "throughput.json")
    train_throughput.main(["--batch", "4", "--steps", "2", "--json", path])
    result = json.load(open(path))
    for name in ("nin", "lowrank_nin"):
        row = result["models"][name]
        assert row["lrjax"] > 0 and len(row["lrjax_step_s"]) == 2
        if result["machine"]["torch"]:  # requirements.txt installs torch on x86_64
            assert row["pytorch"] > 0 and row["lrjax_over_pytorch"] > 0
    assert result["lowrank_speedup_lrjax"] > 0


def test_interleaved_step_times_take_turns():
    order = []
    times = train_throughput.interleaved_step_times(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=3, warmup=1)
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
