"""The ImageNet VGG-16 workflow end to end on mock imagenet2012 with torchvision-format weights."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from experiments import imagenet_workflow
from experiments.configs import imagenet_vgg as vgg_config
from lrjax import checkpoint

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTHS = ((4, 4), (8, 8), (8, 8, 8), (8, 8, 8), (8, 8, 8))


def write_torchvision_vgg(path, widths=WIDTHS):
    """A torchvision-layout VGG-16 state dict (random weights, small widths, 1000 classes)."""
    from tests.test_pretrained import torchvision_vgg16

    torch.manual_seed(0)
    torch.save(torchvision_vgg16(widths, fc=16, classes=1000).state_dict(), path)


def _cli(args, workdir, num_examples=8):
    script = ("import sys, tensorflow_datasets as tfds\n"
              "from absl import app\n"
              "from experiments import imagenet_vgg\n"
              f"with tfds.testing.mock_data(num_examples={num_examples}):\n"
              "    sys.argv = ['imagenet_vgg'] + sys.argv[1:]\n"
              "    app.run(imagenet_vgg.main)\n")
    config = os.path.join(ROOT, "experiments", "configs", "imagenet_vgg.py")
    return subprocess.run([sys.executable, "-c", script, f"--workdir={workdir}",
                           f"--config={config}:tiny", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_default_flow_through_cli(tmp_path):
    weights = str(tmp_path / "vgg16.pth")
    write_torchvision_vgg(weights)
    work = tmp_path / "run"
    out = _cli([f"--config.weights={weights}"], work)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("full_variables", "lowrank_init", "decompose.json", "eval_before.json",
                 "timing.json", "results.json", "results.md"):
        assert (work / name).exists(), name
    assert os.listdir(work / "finetune" / "checkpoints")
    rows = json.load(open(work / "results.json"))
    assert rows[1]["model"] == "vgg16-lowrank" and rows[1]["theoretical_speedup"] >= 2.0
    timing = json.load(open(work / "timing.json"))
    assert rows[1]["actual_speedup"] == pytest.approx(
        timing["full"]["forward_backward_ms"] / timing["lowrank"]["forward_backward_ms"])
    assert rows[1]["top5_after"] is not None
    assert "conv5_3" in out.stdout and "| vgg16-lowrank |" in out.stdout
    dec = json.load(open(work / "decompose.json"))
    convs = {f"conv{b}_{i}" for b, n in enumerate((2, 2, 3, 3, 3), 1) for i in range(1, n + 1)}
    layers = convs | {"fc6", "fc7", "fc8"}  # speedup:2 splits only what it needs
    assert dec["ranks"] and set(dec["ranks"]) < layers and "conv1_1" not in dec["ranks"]


@pytest.mark.slow
def test_stage_resume_after_interruption(tmp_path, preempt_at_step):
    weights = str(tmp_path / "vgg16.pth")
    write_torchvision_vgg(weights)
    with tfds.testing.mock_data(num_examples=8):
        config = vgg_config.get_config("tiny")
        config.weights = weights
        config.num_epochs = 2
        preempt_at_step(3)  # preempted inside fine-tuning
        imagenet_workflow.run(config, str(tmp_path))
        steps = checkpoint.TrainCheckpoints(str(tmp_path / "finetune" / "checkpoints"),
                                            fingerprint={}).all_steps()
        assert steps[-1] == 3 and not (tmp_path / "finetune" / "results.json").exists()
        preempt_at_step(None)
        rows = imagenet_workflow.run(config, str(tmp_path))
    history = json.load(open(tmp_path / "finetune" / "results.json"))[0]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert rows[1]["top5_after"] is not None


@pytest.mark.parametrize("overrides,match", [
    ({"weights": "/nonexistent/vgg16.pth"}, "do not exist"),
    ({"model": "resnet"}, "unknown model 'resnet'"),
    ({"rank_rule": "/nonexistent/ranks.json"}, "cannot read rank file"),
    ({"stages": "import,fly"}, "unknown stages"),
    ({"weights": "MISMATCHED"}, "variables do not match the model"),
])
def test_clear_errors(tmp_path, overrides, match):
    """The workflow's checks, in process (the command line's exit status: the test below)."""
    weights = str(tmp_path / "vgg16.pth")
    if overrides.get("weights") == "MISMATCHED":
        write_torchvision_vgg(weights, widths=((4, 4), (8, 8), (8, 8, 8), (8, 8, 8), (8, 8, 16)))
        overrides = {}
    else:
        write_torchvision_vgg(weights)
    config = vgg_config.get_config("tiny")
    config.weights = weights
    config.update(overrides)
    with tfds.testing.mock_data(num_examples=8), pytest.raises(ValueError, match=match):
        imagenet_workflow.run(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_command_line_missing_dataset_is_one_error_line(tmp_path):
    weights = str(tmp_path / "vgg16.pth")
    write_torchvision_vgg(weights)
    config = os.path.join(ROOT, "experiments", "configs", "imagenet_vgg.py")
    out = subprocess.run([sys.executable, "-m", "experiments.imagenet_vgg",
                          f"--workdir={tmp_path / 'b'}", f"--config={config}:tiny",
                          f"--config.weights={weights}", f"--config.data_dir={tmp_path / 'tfds'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2
    assert "ImageNet needs a manual download" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "b" / "full_variables").exists()  # checked before any stage ran


@pytest.mark.slow
def test_scratch_mode_trains_lowrank_bn_net(tmp_path):
    with tfds.testing.mock_data(num_examples=8):
        config = vgg_config.get_config("tiny")
        config.mode = "scratch"
        config.ranks = {"conv2_1": 4, "conv3_1": 4}
        rows = imagenet_workflow.run(config, str(tmp_path))
    assert rows[0]["model"] == "vgg16-lowrank-bn" and rows[0]["top5"] is not None
    # two of thirteen tiny convs decomposed at rank 4
    assert 1.05 < rows[0]["theoretical_speedup"] < 1.5
    results = json.load(open(tmp_path / "results.json"))
    assert results[0]["status"] == "completed" and len(results[0]["history"]) == 1
