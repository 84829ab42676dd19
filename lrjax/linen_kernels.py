"""The kernels of a linen model's layers in its variables, as the layers compute with them.

Read from a flat variable dict (``{("params", *path, name): array}``): a layer's stored
parameters, those its computation uses (a linen subclass's ``param`` reparametrization, BiT's
weight standardization, :attr:`lrjax.sites.ConvSite.parametrization`) and the work of that
reparametrization (XLA's count); the candidates' kernels in HWIO as the closed form takes them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np

from lrjax import sites
from lrjax.sites import ConvSite

__all__ = ["stored_parameters", "site_parameters", "with_parametrization_flops", "SiteKernels"]


def stored_parameters(flat, site: ConvSite) -> dict:
    """The parameters of the scope holding ``site``'s kernel, by name."""
    prefix = ("params", *site.kernel_key[:-1])
    return {key[-1]: value for key, value in flat.items()
            if len(key) == len(prefix) + 1 and key[:-1] == prefix}


def site_parameters(flat, site: ConvSite) -> dict:
    """A parametrized layer's kernel and bias as its computation uses them."""
    return site.parametrization(stored_parameters(flat, site))


def with_parametrization_flops(found: list[ConvSite], flat, batch: int) -> list[ConvSite]:
    """The sites with :attr:`ConvSite.parametrization_flops` set: XLA's count of each
    parametrization, lowered (one count per layer type and parameter shapes), per example.
    Where the layer casts its parameters to the dtype it computes in, its pair casts its factors
    too (:attr:`ConvSite.param_cast_flops`): the casts are left out of that count, which a
    split saves (a hand-written ``x @ w.astype(jnp.bfloat16)``: the cast is the whole of it)."""
    counted, out = {}, []
    for site in found:
        if site.candidate and site.parametrization is not None:
            stored = stored_parameters(flat, site)
            if site.param_cast_flops:  # (as cast already: no convert lowered)
                used = jax.eval_shape(site.parametrization, stored)
                named = {site.kernel_key[-1]: "kernel", "bias": "bias"}  # (stored: used)
                stored = {k: v.astype(used[named[k]].dtype) if named.get(k) in used else v
                          for k, v in stored.items()}
            key = (sites.parametrization_key(site.parametrization), bool(site.param_cast_flops),
                   tuple(sorted((k, np.shape(v), str(np.result_type(v)))
                                for k, v in stored.items())))
            if key not in counted:
                analysis = jax.jit(site.parametrization).lower(stored).cost_analysis()
                counted[key] = float((analysis or {}).get("flops", 0.0))
            site = dataclasses.replace(site, parametrization_flops=counted[key] / batch)
        out.append(site)
    return out


class SiteKernels(Mapping):
    """``{path: HWIO kernel}`` of the candidates, read from a flat variable dict when first
    asked for (a rank map naming a few layers never copies the others' kernels, e.g. VGG-16's
    400 MB fc6); names and shapes are checked up front."""

    def __init__(self, flat, candidates):
        self._flat, self._sites, self._arrays, self._done = flat, {}, {}, {}
        for s in candidates:
            key = ("params", *s.kernel_key)
            if key not in flat:
                raise ValueError(f"variables have no kernel for layer {s.path!r} "
                                 f"({'/'.join(key)})")
            if s.parametrization is None:  # (else the kernel as used is checked: to_hwio)
                s.check_kernel_shape(np.shape(flat[key]))
            self._sites[s.path], self._arrays[s.path] = s, flat[key]

    def __getitem__(self, path):
        if path not in self._done:
            site = self._sites[path]
            if site.parametrization is not None:
                self._parametrize()
            else:
                self._done[path] = site.to_hwio(self._arrays[path])
        return self._done[path]

    def _parametrize(self) -> None:
        """The kernels of every parametrized layer not read yet, as their layers use them: in
        one jitted call (each layer's ``param`` run eagerly dispatched every op of it, ~65 ms
        a layer: 4.7 s of OWL-ViT's 92 layers, its mask head's 71 weight-standardized convs)."""
        todo = {p: stored_parameters(self._flat, s) for p, s in self._sites.items()
                if s.parametrization is not None and p not in self._done}
        used = jax.jit(lambda stored: {p: self._sites[p].parametrization(v)["kernel"]
                                       for p, v in stored.items()})(todo)
        self._done.update({p: self._sites[p].to_hwio(k) for p, k in used.items()})

    def __iter__(self):
        return iter(self._sites)

    def __len__(self):
        return len(self._sites)
