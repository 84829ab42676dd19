"""The ImageNet compression workflow behind ``python -m experiments.imagenet_vgg``.

Stages, each usable alone (``config.stages``) and each resumable (a stage whose output exists in
the work directory is not run again):

  ``import``     pretrained weights -> ``full_variables/`` (Orbax)
  ``decompose``  rank rule -> closed-form factors -> ``lowrank_init/`` and ``decompose.json``
  ``evaluate``   top-1/top-5 of the full and the low-rank net before fine-tuning -> ``eval_before.json``
  ``finetune``   the authors' recipe on the low-rank net -> ``finetune/`` (checkpoints, logs)
  ``time``       forward and forward+backward time of both nets -> ``timing.json``

then ``results.json`` and ``results.md`` (the authors' table: model, top-5, ms per iteration, actual
and theoretical speedup). ``config.mode = "scratch"`` instead trains a low-rank net with batch norm
from scratch (the authors' CaffeNet recipe).
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp

from lrjax import checkpoint, convert, cost_report, models, pretrained, surgery, train
from lrjax.timing import median_time

__all__ = ["run", "STAGES"]

STAGES = ("import", "decompose", "evaluate", "finetune", "time")
log = logging.getLogger("lrjax.imagenet")


def _primary(what: str, write) -> None:
    """Run ``write`` on process 0 only, then let every process pass once it is done (several
    processes share the workdir; single-process runs just write)."""
    if jax.process_count() == 1:
        write()
        return
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        write()
    multihost_utils.sync_global_devices(f"lrjax:{what}")


def _write_json(path, data) -> None:
    _primary(path, lambda: checkpoint.write_json(path, data))


def _save_variables(path, variables) -> None:
    _primary(path, lambda: checkpoint.save_variables(path, variables))


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _models(config, ranks=None, **overrides):
    kwargs = {**dict(config.model_kwargs or {}), **overrides}
    full = models.get_model(config.model, **kwargs)
    lowrank = None if ranks is None else models.get_model(config.model, ranks=ranks, **kwargs)
    return full, lowrank


def _stages(config) -> list[str]:
    stages = [s.strip() for s in config.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    return stages


def run(config, workdir: str) -> dict:
    """Run the configured stages in ``workdir``; returns the results table's rows."""
    models.model_spec(config.model)  # unknown model: clear error before any work
    if config.multihost:  # before any JAX computation (the stages before fine-tuning run some)
        train.initialize_distributed(config)
    if config.mode == "scratch":
        return _scratch(config, workdir)
    if config.mode != "decompose":
        raise ValueError(f"config.mode must be 'decompose' or 'scratch'; got {config.mode!r}")
    stages = _stages(config)
    os.makedirs(workdir, exist_ok=True)
    x = cost_report.images(1, config.image_size)
    full_path = os.path.join(workdir, "full_variables")
    init_path = os.path.join(workdir, "lowrank_init")
    dec_path = os.path.join(workdir, "decompose.json")
    eval_path = os.path.join(workdir, "eval_before.json")
    full, _ = _models(config)
    # a stage that reads the dataset: a missing one is an error before the import and decompose
    needs_data = "finetune" in stages or ("evaluate" in stages and not os.path.exists(eval_path))
    dataset = train.load_config_dataset(config) if needs_data else None

    if "import" in stages and not os.path.exists(full_path):
        if not config.weights:
            raise ValueError("the import stage needs --config.weights=PATH (torchvision .pth / "
                             ".safetensors, or Keras .h5)")
        variables = pretrained.load_pretrained(config.weights, config.model)
        surgery.check_variables(full, variables, x, train=False)
        _save_variables(full_path, variables)
        log.info("imported %s -> %s", config.weights, full_path)

    def full_variables():
        if not os.path.exists(full_path):
            raise ValueError(f"{full_path} is missing: run the import stage first")
        variables = checkpoint.load_variables(full_path)
        surgery.check_variables(full, variables, x, train=False)
        return variables

    if "decompose" in stages and not os.path.exists(init_path):
        _, result = convert.decompose_checkpoint(
            config.model, full_variables(), config.rank_rule, image_size=config.image_size,
            multiple=config.rank_multiple, **dict(config.model_kwargs or {}))
        print(result.report.table(), flush=True)
        _save_variables(init_path, result.variables)
        _write_json(dec_path, {"rank_rule": str(config.rank_rule), "ranks": result.ranks,
                               **result.report.as_dict()})

    def lowrank_setup():
        if not os.path.exists(dec_path):
            raise ValueError(f"{dec_path} is missing: run the decompose stage first")
        ranks = _read_json(dec_path)["ranks"]
        _, lowrank = _models(config, ranks)
        return ranks, lowrank, checkpoint.load_variables(init_path)

    if "evaluate" in stages and not os.path.exists(eval_path):
        _, lowrank, lowrank_variables = lowrank_setup()
        before = {"full": train.evaluate(full, full_variables(), dataset, config.eval_batch_size),
                  "lowrank": train.evaluate(lowrank, lowrank_variables, dataset,
                                            config.eval_batch_size)}
        _write_json(eval_path, before)
        log.info("before fine-tuning: %s", before)

    finetune = None
    if "finetune" in stages:
        ranks, _, lowrank_variables = lowrank_setup()
        ft = config.copy_and_resolve_references()
        ft.ranks, ft.lowrank = ranks, True
        finetune = train.train_and_evaluate(ft, os.path.join(workdir, "finetune"),
                                            init_variables=lowrank_variables, dataset=dataset)

    time_path = os.path.join(workdir, "timing.json")
    if "time" in stages and not os.path.exists(time_path):
        ranks, _, _ = lowrank_setup()
        timed_full, timed_lowrank = _models(config, ranks, dtype=jnp.dtype(config.dtype))
        _write_json(time_path, {"full": _time(timed_full, config),
                                "lowrank": _time(timed_lowrank, config),
                                "batch": config.time_batch, "dtype": config.dtype,
                                "backend": jax.default_backend()})

    rows = _results(config, workdir, finetune)
    return rows


def _time(model, config) -> dict:
    size = config.image_size
    x = jax.random.normal(jax.random.key(0), (config.time_batch, size, size, 3))
    variables = models.init_variables(model, size)
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
    grad = jax.jit(jax.grad(lambda p, x: jnp.mean(
        model.apply({**variables, "params": p}, x, train=False) ** 2)))
    return {"forward_ms": 1e3 * median_time(fwd, variables, x, repeats=config.time_repeats),
            "forward_backward_ms": 1e3 * median_time(grad, variables["params"], x,
                                                     repeats=config.time_repeats)}


def _results(config, workdir, finetune) -> list[dict]:
    def maybe(path):
        path = os.path.join(workdir, path)
        return _read_json(path) if os.path.exists(path) else {}

    dec, before, timing = maybe("decompose.json"), maybe("eval_before.json"), maybe("timing.json")
    ft_results = maybe(os.path.join("finetune", "results.json"))
    after = ft_results[0] if ft_results else None
    full_ms = timing.get("full", {}).get("forward_backward_ms")
    low_ms = timing.get("lowrank", {}).get("forward_backward_ms")
    rows = [
        {"model": config.model, "top5_before": before.get("full", {}).get("top5"),
         "top5_after": before.get("full", {}).get("top5"), "ms_per_iter": full_ms,
         "actual_speedup": 1.0 if full_ms else None, "theoretical_speedup": 1.0},
        {"model": f"{config.model}-lowrank", "top5_before": before.get("lowrank", {}).get("top5"),
         "top5_after": None if after is None else after["history"][-1].get("test_top5"),
         "ms_per_iter": low_ms,
         "actual_speedup": full_ms / low_ms if full_ms and low_ms else None,
         "theoretical_speedup": dec.get("theoretical_speedup")},
    ]

    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    lines = [f"| model | top-5 before fine-tuning (%) | top-5 (%) | ms / iter "
             f"(fwd+bwd, batch {config.time_batch}) | actual speedup | theoretical speedup |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {fmt(r['top5_before'] and 100 * r['top5_before'], '.2f')} "
                     f"| {fmt(r['top5_after'] and 100 * r['top5_after'], '.2f')} "
                     f"| {fmt(r['ms_per_iter'], '.1f')} | {fmt(r['actual_speedup'], '.2f')} "
                     f"| {fmt(r['theoretical_speedup'], '.2f')} |")
    _write_json(os.path.join(workdir, "results.json"), rows)
    checkpoint.write_text(os.path.join(workdir, "results.md"), "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return rows


def _scratch(config, workdir) -> list[dict]:
    """Train a low-rank net with batch norm from scratch (the authors' CaffeNet-with-BN recipe)."""
    sc = config.copy_and_resolve_references()
    sc.lowrank, sc.bn = True, True
    result = train.train_and_evaluate(sc, workdir)
    top5 = result.history[-1].get("test_top5") if result.history else None
    return [{"model": f"{config.model}-lowrank-bn", "top5": top5,
             "theoretical_speedup": result.theoretical_speedup}]
