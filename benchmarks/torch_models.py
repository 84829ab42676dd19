"""PyTorch twins of the benchmarked nets (random weights, for timing only): the same layers,
widths and ranks as lrjax's, so that PyTorch eager is a reference point on the same architecture.

Each builder takes ``ranks``: one entry per conv in call order (``None`` keeps a conv full rank),
as ``lrjax.surgery.find_convs`` lists them; a decomposed conv is a ``(k, 1)`` conv without bias
followed by a ``(1, k)`` conv, stride, padding and dilation split as in lrjax.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence


def _conv(cin, cout, k, rank=None, stride=1, padding=0, groups=1, bias=True):
    import torch.nn as tnn

    k = (k, k) if isinstance(k, int) else k
    s = (stride, stride) if isinstance(stride, int) else stride
    p = (padding, padding) if isinstance(padding, int) else padding
    if rank is None:
        return tnn.Conv2d(cin, cout, k, s, p, groups=groups, bias=bias)
    return tnn.Sequential(
        tnn.Conv2d(cin, rank, (k[0], 1), (s[0], 1), (p[0], 0), groups=groups, bias=False),
        tnn.Conv2d(rank, cout, (1, k[1]), (1, s[1]), (0, p[1]), groups=groups, bias=bias))


def _ranks(ranks, n):
    ranks = list(ranks) if ranks is not None else [None] * n
    if len(ranks) != n:
        raise ValueError(f"expected {n} ranks (one per conv in call order); got {len(ranks)}")
    return iter(ranks)


def vgg16(ranks: Sequence[int | None] | None = None, num_classes: int = 1000,
          widths=((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
          fc: int = 4096):
    """torchvision's VGG-16 layout (adaptive 7x7 pool, 4096-wide classifier)."""
    import torch.nn as tnn

    it = _ranks(ranks, sum(len(b) for b in widths))
    layers, c = [], 3
    for block in widths:
        for n in block:
            layers += [_conv(c, n, 3, next(it), padding=1), tnn.ReLU(inplace=True)]
            c = n
        layers.append(tnn.MaxPool2d(2, 2))
    return tnn.Sequential(*layers, tnn.AdaptiveAvgPool2d((7, 7)), tnn.Flatten(),
                          tnn.Linear(c * 49, fc), tnn.ReLU(inplace=True), tnn.Dropout(),
                          tnn.Linear(fc, fc), tnn.ReLU(inplace=True), tnn.Dropout(),
                          tnn.Linear(fc, num_classes))


def nin(ranks: Sequence[int | None] | None = None, num_classes: int = 10):
    """NIN (nin_cudnn.lua)."""
    import torch.nn as tnn

    it = _ranks(ranks, 9)
    relu = tnn.ReLU
    return tnn.Sequential(
        _conv(3, 192, 5, next(it), padding=2), relu(), _conv(192, 160, 1, next(it)), relu(),
        _conv(160, 96, 1, next(it)), relu(), tnn.ZeroPad2d((1, 0, 1, 0)), tnn.MaxPool2d(3, 2),
        tnn.Dropout(0.5), _conv(96, 192, 5, next(it), padding=2), relu(),
        _conv(192, 192, 1, next(it)), relu(), _conv(192, 192, 1, next(it)), relu(),
        tnn.ZeroPad2d((1, 0, 1, 0)), tnn.AvgPool2d(3, 2), tnn.Dropout(0.5),
        _conv(192, 192, 3, next(it), padding=1), relu(), _conv(192, 192, 1, next(it)), relu(),
        _conv(192, num_classes, 1, next(it)), tnn.AdaptiveAvgPool2d(1), tnn.Flatten())


def caffenet(ranks: Sequence[int | None] | None = None, num_classes: int = 1000):
    """CaffeNet (grouped conv2/4/5, LRN after pool1 and pool2), input 227."""
    import torch.nn as tnn

    it = _ranks(ranks, 5)
    relu = tnn.ReLU
    lrn = tnn.LocalResponseNorm(5, 1e-4, 0.75, 1.0)
    return tnn.Sequential(
        _conv(3, 96, 11, next(it), stride=4), relu(), tnn.MaxPool2d(3, 2), lrn,
        _conv(96, 256, 5, next(it), padding=2, groups=2), relu(), tnn.MaxPool2d(3, 2), lrn,
        _conv(256, 384, 3, next(it), padding=1), relu(),
        _conv(384, 384, 3, next(it), padding=1, groups=2), relu(),
        _conv(384, 256, 3, next(it), padding=1, groups=2), relu(), tnn.MaxPool2d(3, 2),
        tnn.Flatten(), tnn.Linear(256 * 36, 4096), relu(), tnn.Dropout(),
        tnn.Linear(4096, 4096), relu(), tnn.Dropout(), tnn.Linear(4096, num_classes))


def resnet18(ranks: Sequence[int | None] | None = None, num_classes: int = 100,
             width: int = 64):
    """ResNet-18 in the order of ``benchmarks/user_models.py`` (stem, per block conv, conv and
    the 1x1 projection where the shape changes), batch norm in inference."""
    import torch
    import torch.nn as tnn

    # call order of the Flax model: stem, then per block: conv1, conv2, [projection]
    n_convs = 1 + 8 * 2 + 3
    it = _ranks(ranks, n_convs)

    class Block(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = _conv(cin, cout, 3, next(it), stride=stride, padding=1, bias=False)
            self.bn1 = tnn.BatchNorm2d(cout)
            self.conv2 = _conv(cout, cout, 3, next(it), padding=1, bias=False)
            self.bn2 = tnn.BatchNorm2d(cout)
            self.proj = None
            if stride != 1 or cin != cout:
                self.proj = tnn.Sequential(_conv(cin, cout, 1, next(it), stride=stride,
                                                 bias=False), tnn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.proj is None else self.proj(x)))

    stem = [_conv(3, width, 7, next(it), stride=2, padding=3, bias=False),
            tnn.BatchNorm2d(width), tnn.ReLU(), tnn.MaxPool2d(3, 2, 1)]
    blocks, c = [], width
    for stage in range(4):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            blocks.append(Block(c, width * 2 ** stage, stride))
            c = width * 2 ** stage
    return tnn.Sequential(*stem, *blocks, tnn.AdaptiveAvgPool2d(1), tnn.Flatten(),
                          tnn.Linear(c, num_classes))


BUILDERS = {"vgg16": vgg16, "vgg16-convs": functools.partial(vgg16, fc=16), "nin": nin,
            "caffenet": caffenet, "resnet18": resnet18}
