"""The README's Python examples run as written."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _section_code(title: str) -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    blocks = re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)
    assert blocks, f"no python example under '{title}'"
    return "\n".join(blocks)


@pytest.mark.slow
@pytest.mark.parametrize("title", ["Compress your own model", "The decomposition library",
                                   "Models, surgery and conversion"])
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
    assert sorted(os.listdir(out)) == ["nin.onnx", "nin.shlo", "tiny.tflite"]
    # the user's NNX model was exported in eval mode but is itself untouched
    assert namespace["tiny"].drop.deterministic is False
