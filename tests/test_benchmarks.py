"""The speed benchmark runs end to end (smoke preset: NIN, batch 8, one repeat)."""

import json

from benchmarks import speed


def test_speed_benchmark_smoke(tmp_path):
    path = str(tmp_path / "speed.json")
    results = speed.main(["--preset", "smoke", "--json", path])
    nin = json.load(open(path))["models"]["nin"]
    assert set(nin["variants"]) == {"full", "lowrank (plain pairs)", "+ measured gating",
                                    "+ per-layer formulation"}
    assert nin["theoretical_speedup"] > 1.8
    assert [row["layer"] for row in nin["layers"]] == ["conv1", "conv2"]
    assert results["models"]["nin"]["variants"]["full"]["forward_s"] > 0
