"""The README's Python examples run as written."""

import os
import re
import subprocess
import sys

import pytest

from lrjax import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _section_code(title: str) -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    blocks = re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)
    assert blocks, f"no python example under '{title}'"
    return "\n".join(blocks)


@pytest.mark.slow
def test_readme_zoo_example_runs_as_a_user_runs_it():
    """The zoo section (the whole VGG-16's random init, a decomposition traced at 224) in a fresh
    process under the recommended XLA flags alone, as a user runs it: the suite's -O0 (fast
    compiles) makes the init's random number generation, which dominates here, 2.5x slower."""
    env = dict(os.environ, XLA_FLAGS=xla_flags.RECOMMENDED)
    done = subprocess.run([sys.executable, "-c", _section_code("Models, surgery and conversion")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "total" in done.stdout and "3.06x" in done.stdout  # the cost report, then the table


@pytest.mark.parametrize("title", ["Compress your own model", "The decomposition library"])
def test_readme_examples_run(title, capsys):
    namespace = {}
    exec(compile(_section_code(title), f"README.md: {title}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "total" in out  # each section prints a per-layer table
    if title == "Compress your own model":
        assert namespace["logits"].shape == (8, 10)
        assert namespace["result"].report.net.speedup >= 1.9
        assert namespace["small"](namespace["images"]).shape == (8, 10)
        assert set(namespace["report"].ranks) == {"body/layers/2", "blocks/0"}


@pytest.mark.slow  # 9 s: four exports, each checked in its runtime
def test_readme_deploy_example_exports(capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("ai_edge_litert")
    namespace = {}
    exec(compile(_section_code("Deploy: ONNX, LiteRT, StableHLO"), "README.md: Deploy", "exec"),
         namespace)
    result = namespace["result"]
    assert result.format == "tflite" and result.checked_batches == (1,)
    assert result.max_abs_error <= 1e-5 + 1e-4 * result.scale
    out = namespace["out"]
    assert sorted(os.listdir(out)) == ["nin.onnx", "nin.shlo", "nin_bf16.onnx", "tiny.tflite"]
    # the user's NNX model was exported in eval mode but is itself untouched
    assert namespace["tiny"].drop.deterministic is False
