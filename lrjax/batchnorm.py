"""Batch norm folded into the conv before it, on a linen variable tree (``params`` and
``batch_stats``): what a deploy-time export or a ``bn=False`` twin model runs."""

from __future__ import annotations

from collections.abc import Mapping

from flax import traverse_util

from lrjax import decompose, sites

__all__ = ["fold_batch_norms"]


def fold_batch_norms(variables, pairs: Mapping[str, str], *, eps: float = 1e-5) -> dict:
    """Fold each batch norm that directly follows a conv into the conv's kernel and bias.

    ``pairs`` maps a conv path to the path of the ``nn.BatchNorm`` applied to its output
    (``{"conv1": "bn1"}``). The folded norms' variables are dropped; the caller runs a model
    without those norms (e.g. the zoo's ``bn=False`` twin). Each conv must have a bias.

    Raises:
      ValueError: a path without its arrays, or a conv without a bias.
    """
    flat = traverse_util.flatten_dict(dict(variables)) if variables else {}
    out = dict(flat)

    def get(key, what, required=True):
        if key not in flat:
            if required:
                raise ValueError(f"cannot fold batch norm {what}: {'/'.join(key)} is missing")
            return None
        return sites.device_array(flat[key])

    for conv, bn in pairs.items():
        cpath, bpath = sites.variable_key(conv), sites.variable_key(bn)
        what = f"{bn!r} into {conv!r}"
        if ("params", *cpath, "bias") not in flat:
            raise ValueError(f"cannot fold batch norm {what}: the conv has no bias")
        kernel, bias = decompose.fold_batch_norm(
            get(("params", *cpath, "kernel"), what), get(("params", *cpath, "bias"), what),
            get(("params", *bpath, "scale"), what, False),
            get(("params", *bpath, "bias"), what, False),
            get(("batch_stats", *bpath, "mean"), what), get(("batch_stats", *bpath, "var"), what),
            eps)
        out[("params", *cpath, "kernel")], out[("params", *cpath, "bias")] = kernel, bias
        for key in list(out):
            if key[1:len(bpath) + 1] == bpath:
                del out[key]
    return traverse_util.unflatten_dict(out)
