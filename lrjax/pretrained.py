"""Import public pretrained weights into lrjax variables.

Supported files:

* torchvision ``vgg16`` and ``alexnet`` state dicts: ``.pth``/``.pt`` (read with torch, which must be
  installed) or ``.safetensors``. Conv kernels go OIHW -> HWIO, linear weights (out, in) ->
  (in, out), and the first fully connected layer's rows are reordered from torchvision's NCHW
  flatten order ``(c, h, w)`` to lrjax's NHWC order ``(h, w, c)``.
* Keras ``VGG16`` weights in the Keras HDF5 format (``vgg16_weights_tf_dim_ordering_tf_kernels.h5``:
  groups ``block1_conv1`` ... ``fc1``, ``fc2``, ``predictions``), read with h5py. Keras is channels-last
  like lrjax, so kernels and the flatten order carry over unchanged. Keras weights expect Caffe
  preprocessing (BGR minus the mean pixel).

The result is ``{"params": ...}`` for :class:`lrjax.models.VGG16` / :class:`lrjax.models.AlexNet`;
:func:`lrjax.surgery.check_variables` then checks it against the model.
"""

from __future__ import annotations

import os

import numpy as np

from lrjax.checkpoint import CheckpointError

__all__ = ["load_pretrained", "ARCHITECTURES", "TORCHVISION_LAYERS", "KERAS_VGG16_LAYERS"]

_VGG_NAMES = [f"conv{b}_{i}" for b, n in enumerate((2, 2, 3, 3, 3), start=1)
              for i in range(1, n + 1)]
# torchvision module indices of each layer
TORCHVISION_LAYERS = {
    "vgg16": dict(zip(_VGG_NAMES, [f"features.{i}" for i in
                                   (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)], strict=True))
    | {"fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6"},
    "alexnet": {"conv1": "features.0", "conv2": "features.3", "conv3": "features.6",
                "conv4": "features.8", "conv5": "features.10", "fc6": "classifier.1",
                "fc7": "classifier.4", "fc8": "classifier.6"},
}
KERAS_VGG16_LAYERS = dict(zip(_VGG_NAMES, [f"block{b}_conv{i}" for b, n in
                                           enumerate((2, 2, 3, 3, 3), start=1)
                                           for i in range(1, n + 1)], strict=True)) \
    | {"fc6": "fc1", "fc7": "fc2", "fc8": "predictions"}
ARCHITECTURES = tuple(TORCHVISION_LAYERS)
_POOLED = {"vgg16": 7, "alexnet": 6}  # spatial size before the first fully connected layer


def _read_torch_state(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise CheckpointError(f"{path!r} is not a readable safetensors file: {e}") from None
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"reading {path!r} needs PyTorch (pip install torch), or convert "
                              "it to .safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path!r} is not a readable PyTorch checkpoint: {e}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path!r} does not hold a state dict")
    return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")}


def _from_torchvision(state: dict[str, np.ndarray], arch: str, path: str) -> dict:
    layers = TORCHVISION_LAYERS[arch]
    missing = sorted(f"{m}.{p}" for m in layers.values() for p in ("weight", "bias")
                     if f"{m}.{p}" not in state)
    if missing:
        raise CheckpointError(f"{path!r} is not a torchvision {arch} state dict: missing "
                              f"{missing[:4]}{' ...' if len(missing) > 4 else ''}")
    params = {}
    for name, module in layers.items():
        w, b = state[f"{module}.weight"], state[f"{module}.bias"]
        if name.startswith("conv"):
            if w.ndim != 4:
                raise CheckpointError(f"{path!r}: {module}.weight has shape {w.shape}, expected a "
                                      "4-D conv weight")
            kernel = np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO
        else:
            if w.ndim != 2:
                raise CheckpointError(f"{path!r}: {module}.weight has shape {w.shape}, expected a "
                                      "2-D linear weight")
            kernel = w.T  # (out, in) -> (in, out)
            if name == "fc6":
                s = _POOLED[arch]
                c = kernel.shape[0] // (s * s)
                if c * s * s != kernel.shape[0]:
                    raise CheckpointError(f"{path!r}: {module}.weight has {kernel.shape[0]} "
                                          f"inputs, not a multiple of {s}x{s}")
                # rows (c, h, w) -> (h, w, c)
                kernel = kernel.reshape(c, s, s, -1).transpose(1, 2, 0, 3).reshape(s * s * c, -1)
        params[name] = {"kernel": np.ascontiguousarray(kernel, np.float32),
                        "bias": np.asarray(b, np.float32)}
    return {"params": params}


def _from_keras_h5(path: str) -> dict:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CheckpointError(f"{path!r} is not a readable HDF5 file: {e}") from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        params = {}
        for name, layer in KERAS_VGG16_LAYERS.items():
            if layer not in root:
                raise CheckpointError(f"{path!r} is not Keras VGG16 weights: no group {layer!r}")
            group = root[layer]
            names = [n.decode() if isinstance(n, bytes) else n
                     for n in group.attrs.get("weight_names", [])]
            if len(names) != 2:
                raise CheckpointError(f"{path!r}: layer {layer!r} lists weights {names}, expected "
                                      "a kernel and a bias")
            kernel_name = next((n for n in names if "kernel" in n or n.endswith("W_1:0")), names[0])
            bias_name = next(n for n in names if n != kernel_name)
            kernel, bias = np.asarray(group[kernel_name]), np.asarray(group[bias_name])
            expect = 4 if name.startswith("conv") else 2
            if kernel.ndim != expect:
                raise CheckpointError(f"{path!r}: {layer}/{kernel_name} has shape {kernel.shape}, "
                                      f"expected {expect}-D")
            params[name] = {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}
    return {"params": params}


def load_pretrained(path: str, arch: str = "vgg16") -> dict:
    """Read pretrained weights into lrjax variables ``{"params": ...}`` for ``arch``.

    Args:
      path: ``.pth``/``.pt``/``.safetensors`` (torchvision) or ``.h5`` (Keras VGG16).
      arch: ``"vgg16"`` or ``"alexnet"`` (torchvision only).

    Raises:
      CheckpointError: a missing or unreadable file, or one that is not such a checkpoint.
      ValueError: an unknown architecture or file type.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")
    if not os.path.isfile(path):
        raise CheckpointError(f"pretrained weights {path!r} do not exist (torchvision: "
                              "download vgg16-397923af.pth; Keras: "
                              "vgg16_weights_tf_dim_ordering_tf_kernels.h5)")
    if path.endswith((".pth", ".pt", ".safetensors")):
        return _from_torchvision(_read_torch_state(path), arch, path)
    if path.endswith((".h5", ".hdf5")):
        if arch != "vgg16":
            raise ValueError("Keras .h5 import supports vgg16 only")
        return _from_keras_h5(path)
    raise ValueError(f"unknown weights file type {path!r}: expected .pth, .pt, .safetensors or .h5")
