"""Pretrained-weight import: small files written by the tests in each real format."""

import h5py
import jax
import numpy as np
import pytest

from lrjax import models, pretrained, surgery
from lrjax.checkpoint import CheckpointError
from lrjax.cost_report import images
from tests.helpers import apply

torch = pytest.importorskip("torch")
tnn = torch.nn

VGG_WIDTHS = ((4, 4), (8, 8), (8, 8, 8), (16, 16, 16), (16, 16, 16))
ALEX_WIDTHS = (8, 16, 16, 16, 16)
FC = 32
CLASSES = 10
SIZE = 64


def torchvision_vgg16(widths=VGG_WIDTHS, fc=FC, classes=CLASSES):
    """torchvision's VGG-16 module layout (indices of features/classifier), small widths."""
    layers, c = [], 3
    for block in widths:
        for n in block:
            layers += [tnn.Conv2d(c, n, 3, padding=1), tnn.ReLU()]
            c = n
        layers.append(tnn.MaxPool2d(2, 2))
    classifier = tnn.Sequential(tnn.Linear(c * 49, fc), tnn.ReLU(), tnn.Dropout(),
                                tnn.Linear(fc, fc), tnn.ReLU(), tnn.Dropout(),
                                tnn.Linear(fc, classes))
    return TorchNet(tnn.Sequential(*layers), tnn.AdaptiveAvgPool2d((7, 7)), classifier)


class TorchNet(tnn.Module):
    def __init__(self, features, pool, classifier):
        super().__init__()
        self.features, self.avgpool, self.classifier = features, pool, classifier

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def torchvision_alexnet():
    w1, w2, w3, w4, w5 = ALEX_WIDTHS
    features = tnn.Sequential(
        tnn.Conv2d(3, w1, 11, 4, 2), tnn.ReLU(), tnn.MaxPool2d(3, 2),
        tnn.Conv2d(w1, w2, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(3, 2),
        tnn.Conv2d(w2, w3, 3, padding=1), tnn.ReLU(), tnn.Conv2d(w3, w4, 3, padding=1), tnn.ReLU(),
        tnn.Conv2d(w4, w5, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(3, 2))
    classifier = tnn.Sequential(tnn.Dropout(), tnn.Linear(w5 * 36, FC), tnn.ReLU(), tnn.Dropout(),
                                tnn.Linear(FC, FC), tnn.ReLU(), tnn.Linear(FC, CLASSES))
    return TorchNet(features, tnn.AdaptiveAvgPool2d((6, 6)), classifier)


def _randomise(net):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return net.eval()


@pytest.mark.parametrize("arch", ["vgg16", "alexnet"])
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_torchvision_import_matches_torch(tmp_path, arch, fmt):
    if arch == "vgg16":
        net = _randomise(torchvision_vgg16())
        model = models.get_model("vgg16", widths=VGG_WIDTHS, fc_features=FC, num_classes=CLASSES)
    else:
        net = _randomise(torchvision_alexnet())
        model = models.get_model("alexnet", widths=ALEX_WIDTHS, fc_features=FC,
                                 num_classes=CLASSES)
    path = str(tmp_path / f"w.{fmt}")
    if fmt == "pth":
        torch.save(net.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    variables = pretrained.load_pretrained(path, arch)
    surgery.check_variables(model, variables, images(1, SIZE), train=False)
    x = np.random.default_rng(0).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    got = np.asarray(apply(model, variables, x))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _numpy_vgg(params, x):
    """Independent NumPy forward of Keras VGG16 (channels-last, SAME 3x3 convs, 2x2 max pools)."""
    def conv(x, k, b):
        xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        h, w = x.shape[1:3]
        out = sum(np.einsum("nhwc,co->nhwo", xp[:, i:i + h, j:j + w], k[i, j])
                  for i in range(3) for j in range(3))
        return np.maximum(out + b, 0)

    names = [f"block{b}_conv{i}" for b, n in enumerate((2, 2, 3, 3, 3), 1) for i in range(1, n + 1)]
    idx = 0
    for n in (2, 2, 3, 3, 3):
        for _ in range(n):
            x = conv(x, *params[names[idx]])
            idx += 1
        nb, h, w, c = x.shape
        x = x.reshape(nb, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    x = x.reshape(x.shape[0], -1)
    x = np.maximum(x @ params["fc1"][0] + params["fc1"][1], 0)
    x = np.maximum(x @ params["fc2"][0] + params["fc2"][1], 0)
    return x @ params["predictions"][0] + params["predictions"][1]


def _write_keras_h5(path, rng):
    """The Keras HDF5 weights layout: layer groups, 'weight_names' attributes, 'kernel:0'."""
    params, c = {}, 3
    names = [f"block{b}_conv{i}" for b, n in enumerate((2, 2, 3, 3, 3), 1) for i in range(1, n + 1)]
    widths = [w for block in VGG_WIDTHS for w in block]
    for name, n in zip(names, widths, strict=True):
        params[name] = (rng.standard_normal((3, 3, c, n)).astype(np.float32) * 0.3,
                        rng.standard_normal(n).astype(np.float32) * 0.1)
        c = n
    size = 7  # 224 / 32: the input size Keras VGG16 with include_top expects
    dims = [(size * size * c, FC), (FC, FC), (FC, CLASSES)]
    for name, (i, o) in zip(("fc1", "fc2", "predictions"), dims, strict=True):
        params[name] = (rng.standard_normal((i, o)).astype(np.float32) * 0.1,
                        rng.standard_normal(o).astype(np.float32) * 0.1)
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [n.encode() for n in ["input_1", *params]]
        f.create_group("input_1").attrs["weight_names"] = []
        for name, (k, b) in params.items():
            g = f.create_group(name)
            g.attrs["weight_names"] = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
            g.create_dataset(f"{name}/kernel:0", data=k)
            g.create_dataset(f"{name}/bias:0", data=b)
    return params


def test_keras_h5_import_matches_numpy_reference(tmp_path):
    rng = np.random.default_rng(1)
    path = str(tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels.h5")
    params = _write_keras_h5(path, rng)
    variables = pretrained.load_pretrained(path, "vgg16")
    model = models.get_model("vgg16", widths=VGG_WIDTHS, fc_features=FC, num_classes=CLASSES)
    surgery.check_variables(model, variables, images(1, 224), train=False)
    x = rng.standard_normal((1, 224, 224, 3)).astype(np.float32)
    want = _numpy_vgg(params, x)
    got = np.asarray(jax.jit(model.apply)(variables, x))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_import_errors(tmp_path):
    with pytest.raises(CheckpointError, match="do not exist"):
        pretrained.load_pretrained(str(tmp_path / "none.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        pretrained.load_pretrained(str(junk))
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, str(other))
    with pytest.raises(CheckpointError, match=r"not a torchvision vgg16 state dict: missing"):
        pretrained.load_pretrained(str(other))
    bad_h5 = tmp_path / "bad.h5"
    with h5py.File(bad_h5, "w") as f:
        f.create_group("dense")
    with pytest.raises(CheckpointError, match="no group 'block1_conv1'"):
        pretrained.load_pretrained(str(bad_h5))
    with pytest.raises(ValueError, match="unknown weights file type"):
        (tmp_path / "w.bin").write_bytes(b"")
        pretrained.load_pretrained(str(tmp_path / "w.bin"))
    # right format, wrong shapes for the model
    torch.save(torchvision_vgg16().state_dict(), str(tmp_path / "small.pth"))
    variables = pretrained.load_pretrained(str(tmp_path / "small.pth"))
    with pytest.raises(ValueError, match="variables do not match the model: wrong shape"):
        surgery.check_variables(models.get_model("vgg16"), variables, images(1, 224),
                                train=False)
