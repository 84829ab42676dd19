"""Training engine: train state, jitted data-parallel steps, and the train-and-evaluate loop.

``train_step`` and ``eval_step`` are pure and compiled once with ``jax.jit`` over a 1-D
``jax.sharding.Mesh`` of every device (axis ``"data"``): the batch is sharded along it, the train
state replicated and donated. The same code runs on one CPU, one GPU or many; multi-host runs call
``jax.distributed.initialize()`` first (``config.multihost``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lrjax import checkpoint, models
from lrjax.cost_report import cost_report
from lrjax.reporting import RunResult, SummaryWriter, progress_bar, write_results

__all__ = [
    "TrainState", "TrainingDiverged", "make_optimizer", "lr_schedule", "scaled_lr_values",
    "create_train_state", "state_from_variables", "train_step", "evaluate", "setup",
    "load_config_dataset", "restore_or_init", "train_loop", "train_and_evaluate",
    "validate_config", "build_model",
    "Run", "Progress", "RunResult", "run_label", "write_results",
]

log = logging.getLogger("lrjax.train")


class TrainState(train_state.TrainState):
    """Flax's TrainState plus BatchNorm statistics and the dropout base key."""

    batch_stats: Any = None
    rng: jax.Array = None  # raw uint32 key; step keys are fold_in(rng, step)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


def lr_schedule(values, boundaries_epochs, steps_per_epoch: int) -> optax.Schedule:
    """Piecewise-constant learning rate: ``values[i]`` from epoch ``boundaries[i-1]`` on."""
    values, bounds = list(values), list(boundaries_epochs)
    if len(values) != len(bounds) + 1:
        raise ValueError(f"lr values {values} need exactly one more entry than boundaries {bounds}")
    if bounds != sorted(bounds):
        raise ValueError(f"lr boundaries must increase; got {bounds}")
    steps = jnp.asarray([b * steps_per_epoch for b in bounds], jnp.int32)
    table = jnp.asarray(values, jnp.float32)
    return lambda step: table[jnp.searchsorted(steps, step, side="right")]


def scaled_lr_values(config) -> tuple[float, ...]:
    """``config.lr_values``, scaled by ``batch_size / lr_reference_batch`` when the config sets a
    reference batch (the linear scaling rule: the authors' ImageNet recipe is given at batch 64)."""
    ref = config.get("lr_reference_batch")
    if ref is None:
        return tuple(config.lr_values)
    if not isinstance(ref, int) or ref < 1:
        raise ValueError(f"config.lr_reference_batch must be a positive integer; got {ref!r}")
    return tuple(v * config.batch_size / ref for v in config.lr_values)


def make_optimizer(config, steps_per_epoch: int, schedule: optax.Schedule | None = None
                   ) -> optax.GradientTransformation:
    """SGD with momentum and (Torch-style, added to the gradient) weight decay, on the
    piecewise-constant schedule of :func:`scaled_lr_values` (or ``schedule``, already built)."""
    if schedule is None:
        schedule = lr_schedule(scaled_lr_values(config), config.lr_boundaries_epochs,
                               steps_per_epoch)
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(schedule, momentum=config.momentum))


def reset_momentum(opt_state):
    """Zero the momentum traces (the authors reset momentum at each schedule change)."""
    return jax.tree.map(
        lambda s: s._replace(trace=jax.tree.map(jnp.zeros_like, s.trace))
        if isinstance(s, optax.TraceState) else s,
        opt_state, is_leaf=lambda s: isinstance(s, optax.TraceState))


def create_train_state(model, tx, image_shape, seed: int) -> TrainState:
    """A fresh train state (pure: jit it with ``out_shardings`` to create it on devices)."""
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
    variables = model.init(init_key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats"), rng=dropout_key)


def state_from_variables(model, variables, tx, seed: int = 0) -> TrainState:
    """A train state holding existing variables (e.g. ``decompose_linen``'s), to fine-tune with
    :func:`train_step`."""
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats"),
                             rng=jax.random.PRNGKey(seed))


def _variables(state: TrainState, params=None):
    v = {"params": state.params if params is None else params}
    if state.batch_stats is not None:
        v["batch_stats"] = state.batch_stats
    return v


def _metric_sums(logits, labels, mask, loss_per_example):
    num_classes = logits.shape[-1]
    top1 = jnp.argmax(logits, -1) == labels
    sums = {"loss": jnp.sum(loss_per_example * mask), "top1": jnp.sum(top1 * mask),
            "count": jnp.sum(mask)}
    if num_classes > 5:
        top5 = jnp.any(jax.lax.top_k(logits, 5)[1] == labels[:, None], axis=-1)
        sums["top5"] = jnp.sum(top5 * mask)
    return sums


def zero_metrics(num_classes: int):
    keys = ("loss", "top1", "count") + (("top5",) if num_classes > 5 else ())
    return {k: jnp.zeros((), jnp.float32) for k in keys}


def train_step(state: TrainState, batch, metrics):
    """One SGD step; returns the new state and the metric sums accumulated on device."""
    rng = jax.random.fold_in(state.rng, state.step)
    mutable = ["batch_stats"] if state.batch_stats is not None else []

    def loss_fn(params):
        out = state.apply_fn(_variables(state, params), batch["image"], train=True,
                             rngs={"dropout": rng}, mutable=mutable or False)
        logits, updates = out if mutable else (out, {})
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return jnp.mean(losses), (logits, losses, updates)

    grads, (logits, losses, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    if mutable:
        state = state.replace(batch_stats=updates["batch_stats"])
    mask = jnp.ones_like(losses)
    step_sums = _metric_sums(logits, batch["label"], mask, losses)
    return state, jax.tree.map(jnp.add, metrics, step_sums)


def _eval_sums(apply_fn, variables, batch):
    logits = apply_fn(variables, batch["image"], train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return _metric_sums(logits, batch["label"], batch["mask"].astype(jnp.float32), losses)


def _jit_eval_sums(apply_fn, mesh: Mesh):
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(functools.partial(_eval_sums, apply_fn), in_shardings=(replicated, sharded),
                   out_shardings=replicated)


def evaluate(model, variables, dataset, batch_size: int, *, eval_sums=None) -> dict[str, float]:
    """Mean loss, top-1 (and top-5) of ``model`` over every test example of ``dataset``.

    The batch is sharded over all devices, the variables replicated; the last batch is padded
    and masked, so every example counts once.

    Args:
      eval_sums: an already jitted ``(variables, batch) -> metric sums`` (a training run reuses
        its own); built from ``model.apply`` otherwise.
    """
    if batch_size % jax.device_count():
        raise ValueError(f"eval batch size {batch_size} is not divisible by the "
                         f"{jax.device_count()} devices")
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step = eval_sums or _jit_eval_sums(model.apply, mesh)
    variables = jax.device_put(variables, replicated)
    sums = None
    for batch in dataset.test_batches(batch_size):
        batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharded, x), batch)
        out = step(variables, batch)
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    m = {k: float(v) for k, v in jax.device_get(sums).items()}
    if not math.isfinite(m["loss"]):
        raise TrainingDiverged(f"evaluation loss is {m['loss']}")
    n = max(m.pop("count"), 1.0)
    return {k: v / n for k, v in m.items()}


def initialize_distributed(config) -> None:
    """``jax.distributed.initialize`` for a run over several processes (hosts), before JAX
    touches a device: coordinator address, process count and id from the config where set
    (``coordinator_address``, ``num_processes``, ``process_id``), else JAX's own cluster
    detection (SLURM, Open MPI, Kubernetes, TPU pods). CPU processes exchange their collectives
    through gloo. A process that stops answering is detected by the others within
    ``heartbeat_timeout_seconds`` (they then exit with JAX's error instead of waiting forever).
    Nothing happens if JAX's distributed runtime is already up.

    Raises:
      ValueError: a coordinator without a process count and id, or an id out of range.
    """
    if jax.distributed.is_initialized():
        return
    kwargs = {}
    address = config.get("coordinator_address") or ""
    count, index = config.get("num_processes", 0) or 0, config.get("process_id", -1)
    if address:
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"config.coordinator_address={address!r} needs config.num_processes"
                             f" >= 1 and 0 <= config.process_id < num_processes; got "
                             f"num_processes={count}, process_id={index}")
        kwargs.update(coordinator_address=address, num_processes=count, process_id=index)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        **kwargs, heartbeat_timeout_seconds=int(config.get("heartbeat_timeout_seconds", 100)))


def validate_config(config, num_devices: int, *, zoo_model: bool = True) -> None:
    """Raise ``ValueError`` with a clear message for a config that cannot run.

    ``zoo_model=False``: the model is given by the caller, ``config.model`` is only a label.
    """
    if zoo_model:
        models.model_spec(config.model)  # unknown model
    if config.dataset not in ("cifar10", "digits", "imagenet2012"):
        raise ValueError(f"unknown dataset {config.dataset!r}; choose cifar10, digits or "
                         "imagenet2012")
    for field in ("batch_size", "eval_batch_size", "num_epochs"):
        value = getattr(config, field)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{field} must be a positive integer; got {value!r}")
    for field in ("batch_size", "eval_batch_size"):
        if getattr(config, field) % num_devices:
            raise ValueError(f"config.{field}={getattr(config, field)} is not divisible by the "
                             f"{num_devices} devices")
    if config.steps_per_epoch is not None and config.steps_per_epoch < 1:
        raise ValueError(f"config.steps_per_epoch must be positive or None; got "
                         f"{config.steps_per_epoch}")
    if config.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.dtype must be float32 or bfloat16; got {config.dtype!r}")


def _fingerprint(config, num_classes, steps_per_epoch) -> dict:
    """Facts a resumed run must share with the checkpoint, normalised through JSON."""
    def plain(v):
        return v.to_dict() if hasattr(v, "to_dict") else v

    facts = {"model": config.model, "lowrank": bool(config.get("lowrank")),
             "bn": bool(config.get("bn")), "dataset": config.dataset, "num_classes": num_classes,
             "batch_size": config.batch_size, "steps_per_epoch": steps_per_epoch,
             "seed": config.seed, "ranks": plain(config.get("ranks")),
             "model_kwargs": plain(config.get("model_kwargs"))}
    return json.loads(json.dumps(facts))


class _Sigterm:
    """Records SIGTERM so the loop can save and stop cleanly at the next step."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class Run:
    """Everything a training run is made of, built once by :func:`setup`."""

    config: Any
    workdir: str
    dataset: Any
    model: Any
    steps_per_epoch: int
    mesh: Mesh
    init: Any  # jitted: () -> a fresh TrainState, replicated
    abstract_state: Any
    train_step: Any  # jitted train_step over the mesh, state and metrics donated
    eval_step: Any  # jitted _eval_sums over the mesh
    reset_momentum: Any
    checkpoints: checkpoint.TrainCheckpoints
    schedule: optax.Schedule

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data"))


@dataclasses.dataclass
class Progress:
    """Where a run stands: epoch, batch within it, history rows and seconds trained."""

    epoch: int = 0
    position: int = 0
    history: list = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0


def run_label(config) -> str:
    """A run's label: ``nin``, ``nin-lowrank``, ``nin-bn``, ``nin-lowrank-bn``, ..."""
    return (config.model + ("-lowrank" if config.get("lowrank") or config.get("ranks") else "")
            + ("-bn" if config.get("bn") else ""))


def build_model(config, num_classes: int):
    """The model a config names: ``get_model(config.model, lowrank=..., bn=..., ranks=...)``."""
    kwargs = {"num_classes": num_classes, "dtype": jnp.dtype(config.dtype),
              "bn_momentum": config.bn_momentum, "lowrank": bool(config.get("lowrank")),
              "bn": bool(config.get("bn"))}
    if config.get("ranks"):
        kwargs["ranks"] = dict(config.ranks)
    kwargs.update(config.get("model_kwargs") or {})
    return models.get_model(config.model, **kwargs)


def load_config_dataset(config):
    """The dataset ``config`` trains on (:func:`lrjax.data.load_dataset` with the config's
    dataset fields; the ImageNet ones only for ``imagenet2012``).

    Raises:
      ValueError: unknown dataset. DataError: missing data (the message says how to get it).
    """
    from lrjax import data as data_lib  # TensorFlow is imported only when training

    return data_lib.load_dataset(
        config.dataset, data_dir=config.data_dir, download=config.download,
        **({k: config[k] for k in ("image_size", "resize", "normalisation", "scale_augment")}
           if config.dataset == "imagenet2012" else {}))


def setup(config, workdir: str, *, model=None, dataset=None) -> Run:
    """Validate the config, load the data and build the model, the jitted steps and the
    checkpoint manager of a run.

    Args:
      model: a linen model to train instead of the one the config names (e.g. the ``.module``
        of :func:`lrjax.decompose_linen`); called as ``model.apply(variables, images,
        train=...)``. ``config.model`` is then only its label.
      dataset: the config's dataset, loaded already (:func:`load_config_dataset`).
    """
    if config.multihost:
        initialize_distributed(config)
    devices = jax.devices()
    validate_config(config, len(devices), zoo_model=model is None)
    if dataset is None:  # before the workdir: no empty run folder on a data error
        dataset = load_config_dataset(config)
    os.makedirs(workdir, exist_ok=True)
    local_batch = config.batch_size // jax.process_count()
    steps_per_epoch = config.steps_per_epoch or dataset.num_train // local_batch
    if steps_per_epoch < 1:
        raise ValueError(f"batch size {config.batch_size} exceeds the {dataset.num_train} "
                         "training examples")
    if model is None:
        model = build_model(config, dataset.num_classes)
    schedule = lr_schedule(scaled_lr_values(config), config.lr_boundaries_epochs,
                           steps_per_epoch)
    tx = make_optimizer(config, steps_per_epoch, schedule)
    image_shape = (dataset.image_size, dataset.image_size, 3)

    mesh = Mesh(np.asarray(devices), ("data",))
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    init = jax.jit(functools.partial(create_train_state, model, tx, image_shape, config.seed),
                   out_shardings=replicated)
    ckpts = checkpoint.TrainCheckpoints(
        os.path.join(workdir, "checkpoints"),
        fingerprint=_fingerprint(config, dataset.num_classes, steps_per_epoch),
        keep=config.keep_checkpoints, keep_best=1)
    return Run(
        config=config, workdir=workdir, dataset=dataset, model=model,
        steps_per_epoch=steps_per_epoch, mesh=mesh, init=init,
        abstract_state=jax.eval_shape(init),
        train_step=jax.jit(train_step, in_shardings=(replicated, batch_sharding, replicated),
                           out_shardings=(replicated, replicated), donate_argnums=(0, 2)),
        eval_step=_jit_eval_sums(model.apply, mesh),
        reset_momentum=jax.jit(reset_momentum, in_shardings=replicated,
                               out_shardings=replicated, donate_argnums=0),
        checkpoints=ckpts, schedule=schedule)


def restore_or_init(run: Run, init_variables=None) -> tuple[TrainState, Progress]:
    """The latest checkpoint of the run if there is one, else a fresh state (with
    ``init_variables``' params and batch statistics when given)."""
    latest = run.checkpoints.latest_step()
    if latest is not None:
        abstract = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=run.replicated),
            run.abstract_state)
        state, meta = run.checkpoints.restore(latest, abstract)
        log.info("resumed from step %d (epoch %d, batch %d)", latest, meta["epoch"],
                 meta["position"])
        return state, Progress(meta["epoch"], meta["position"], meta["history"],
                               meta["train_seconds"])
    state = run.init()
    if init_variables is not None:
        state = state.replace(
            params=jax.device_put(init_variables["params"], run.replicated),
            batch_stats=(jax.device_put(init_variables["batch_stats"], run.replicated)
                         if state.batch_stats is not None else None))
    return state, Progress()


def _fetch(metrics, where: str, run: Run) -> dict[str, float]:
    """Metric sums -> means on the host; stops with ``TrainingDiverged`` on a NaN/Inf loss."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(m["loss"]):
        raise TrainingDiverged(
            f"loss became {m['loss']} {where}; stopping. The last good checkpoint "
            f"(step {run.checkpoints.latest_step()}) in {run.checkpoints.directory} is intact: "
            "lower the learning rate or check the data, then resume.")
    n = max(m.pop("count"), 1.0)
    return {k: v / n for k, v in m.items()}


def train_loop(run: Run, state: TrainState, progress: Progress) -> RunResult:
    """Train from ``progress`` to ``config.num_epochs``, evaluating and checkpointing each epoch;
    saves and stops cleanly on SIGTERM (status ``"preempted"``)."""
    config, dataset, ckpts = run.config, run.dataset, run.checkpoints
    spe = run.steps_per_epoch
    num_classes = dataset.num_classes
    writer = SummaryWriter(os.path.join(run.workdir, "tensorboard"))
    boundaries = {b * spe for b in config.lr_boundaries_epochs}

    def to_global(batch):
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(run.batch_sharding, x), batch)

    status = "completed"
    history, elapsed = progress.history, progress.train_seconds
    train_iter = dataset.train_batches(config.batch_size // jax.process_count(),
                                       seed=config.seed, augment=config.augment,
                                       start_batch=progress.epoch * spe + progress.position)
    bar = progress_bar(config, run_label(config), progress.epoch, progress.position, spe)
    position = progress.position
    with _Sigterm() as sigterm:
        for epoch in range(progress.epoch, config.num_epochs):
            metrics = zero_metrics(num_classes)
            t0 = time.perf_counter()
            train_sums = []
            for pos in range(position, spe):
                step = epoch * spe + pos
                if config.reset_momentum and step in boundaries and step > 0:
                    state = run.reset_momentum(state)
                state, metrics = run.train_step(state, to_global(next(train_iter)), metrics)
                bar.update(config.batch_size)
                if (pos + 1) % config.log_every_steps == 0 or pos + 1 == spe:
                    m = _fetch(metrics, f"at step {step + 1}", run)
                    train_sums.append(m)
                    writer.scalars(step + 1, {f"train/{k}": v for k, v in m.items()})
                    bar.set_postfix(loss=f"{m['loss']:.3f}", top1=f"{m['top1']:.3f}")
                    metrics = zero_metrics(num_classes)
                if sigterm.received:
                    elapsed += time.perf_counter() - t0
                    _fetch(metrics, f"at step {step + 1}", run)
                    ckpts.save(step + 1, state, {"epoch": epoch, "position": pos + 1,
                                                 "history": history, "train_seconds": elapsed})
                    status = "preempted"
                    break
            if status == "preempted":
                break
            position = 0
            elapsed += time.perf_counter() - t0
            test = evaluate(run.model, _variables(state), dataset, config.eval_batch_size,
                            eval_sums=run.eval_step)
            train_m = train_sums[-1] if train_sums else {}
            row = {"epoch": epoch + 1, "step": (epoch + 1) * spe,
                   **{f"train_{k}": v for k, v in train_m.items()},
                   **{f"test_{k}": v for k, v in test.items()},
                   "lr": float(run.schedule((epoch + 1) * spe - 1))}
            history.append(row)
            writer.scalars(row["step"], {f"test/{k}": v for k, v in test.items()})
            bar.write(f"epoch {epoch + 1}: train loss {train_m.get('loss', float('nan')):.4f}"
                      f" top1 {train_m.get('top1', float('nan')):.4f} | test loss "
                      f"{test['loss']:.4f} top1 {test['top1']:.4f}")
            if (epoch + 1) % config.checkpoint_every_epochs == 0 or epoch + 1 == config.num_epochs:
                ckpts.save(row["step"], state, {"epoch": epoch + 1, "position": 0,
                                                "history": history, "train_seconds": elapsed},
                           test_accuracy=test["top1"])
    bar.close()
    writer.close()
    ckpts.close()
    image_shape = (dataset.image_size, dataset.image_size, 3)
    report = cost_report(run.model, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32),
                         train=False)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.abstract_state.params))
    tests = [h["test_top1"] for h in history]
    result = RunResult(
        model=run_label(config), params=n_params, macs=report.lowrank_macs, full_macs=report.full_macs,
        theoretical_speedup=report.speedup, best_test_top1=max(tests) if tests else float("nan"),
        final_test_top1=tests[-1] if tests else float("nan"), train_seconds=elapsed,
        history=history, status=status, state=state)
    if status == "completed" and jax.process_index() == 0:
        write_results(run.workdir, [result])
    return result


def train_and_evaluate(config, workdir: str, *, model=None, init_variables=None,
                       dataset=None) -> RunResult:
    """Train on ``config.dataset``, evaluating and checkpointing every epoch.

    :func:`setup`, then :func:`restore_or_init`: the latest checkpoint in
    ``workdir/checkpoints`` if there is one, else ``init_variables`` (e.g. decomposed pretrained
    weights) or a fresh init; then :func:`train_loop`. Writes TensorBoard events,
    ``results.json``, ``results.md`` and ``curves.png`` to ``workdir``.

    Args:
      model: train this linen model instead of the zoo model the config names (e.g. a
        decomposed user model); ``init_variables`` then usually are its variables.
      dataset: the config's dataset, loaded already (see :func:`setup`).

    Raises:
      ValueError: a bad config. DataError: missing data. CheckpointError: a checkpoint from a
      different model or config. TrainingDiverged: NaN/Inf loss (the last good checkpoint stays).
    """
    run = setup(config, workdir, model=model, dataset=dataset)
    state, progress = restore_or_init(run, init_variables)
    return train_loop(run, state, progress)
