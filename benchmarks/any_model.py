"""Compressing models lrjax did not write: accuracy and agreement vs theoretical speedup for
data-free, calibrated and eval-guided ranks, before and after a short fine-tune.

Models written without lrjax (``benchmarks/user_models.py``):

* a small bottleneck ResNet (1x1 convs, batch norm) and an MLP-Mixer (dense layers) *trained
  here* on the digits, compressed at 2x fewer multiply-adds of the whole net (every conv and
  dense layer a candidate): test accuracy before fine-tuning, per method;

* a small CNN *trained here* on scikit-learn's offline digits (1,347 training / 450 test images,
  32x32): test accuracy and top-1 agreement with the full model, before fine-tuning and after a
  short fine-tune of the low-rank model;
* a ResNet-18 in the Flax examples' style with random weights (64x64 inputs; batch-norm scales
  set to 1 and running statistics estimated on random images, so that every residual branch
  counts): relative logit error and top-1 agreement with the full model on held-out random inputs.

Methods at each target (times fewer multiply-adds over all convs):

* ``data-free``: ``rule="speedup:S"`` (Zhang et al.'s energy allocation), closed-form factors;
* ``calibrated``: the same rule with ``calibration=`` (calibrated spectra and factors);
* ``calibrated + eval-guided``: ``rule=lrjax.ranks.EvalGuided`` scored by the cross-entropy on a
  validation split carved from the *training* images (the test split is never used to choose),
  calibrated factors.

    python -m benchmarks.any_model --json bench_results/any_model.json --plot bench_results/any_model.png
"""

from __future__ import annotations

import argparse
import functools

import numpy as np

from benchmarks import common

TARGETS = (1.5, 2.0, 3.0, 4.0)
METHODS = ("data-free", "calibrated", "calibrated + eval-guided")


def _accuracy(module, variables, images, labels, batch=500) -> float:
    import jax

    fn = jax.jit(lambda v, x: module.apply(v, x, train=False))
    hits = 0
    for i in range(0, len(images), batch):
        hits += int((np.argmax(fn(variables, images[i:i + batch]), -1) == labels[i:i + batch]).sum())
    return hits / len(images)


def _neg_loss(module, variables, images, labels) -> float:
    """Minus the mean cross-entropy: a smoother score than accuracy on a small split."""
    import jax
    import optax

    logits = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, images)
    return -float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())


def _predictions(module, variables, images):
    import jax

    return np.argmax(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, images), -1)


def _train(module, variables, images, labels, *, epochs, lr, batch, seed):
    """Adam on (images, labels); returns the new variables."""
    import jax
    import optax

    from lrjax import train

    # a copy: the step donates its state, and decomposed variables share arrays with the original
    variables = jax.tree.map(lambda a: a.copy(), variables)
    state = train.state_from_variables(module, variables, optax.adam(lr), seed)
    step = jax.jit(train.train_step, donate_argnums=(0, 2))
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(images))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            state, _ = step(state, {"image": images[idx], "label": labels[idx]},
                            train.zero_metrics(10))
    return train._variables(state)


def _compress(model, variables, method, target, calib, val_eval, example):
    """``decompose_linen`` of a model at ``target`` by one of :data:`METHODS`."""
    from lrjax import ranks
    from lrjax.surgery import decompose_linen

    kwargs = {} if method == "data-free" else {"calibration": calib}
    rule = (ranks.EvalGuided(lambda m, v: val_eval(m, v), target_speedup=target)
            if "eval-guided" in method else f"speedup:{target}")
    return decompose_linen(model, variables, example, rule=rule, train=False, **kwargs)


def digits_study(targets, log, *, epochs=12, finetune_epochs=2, seed=0) -> dict:
    import jax

    from benchmarks.user_models import DigitsCNN
    from lrjax import data

    ds = data.load_dataset("digits")
    train_x, train_y = ds.as_arrays("train")
    test_x, test_y = ds.as_arrays("test")
    # a validation split from the training images, for eval-guided selection only
    order = np.random.default_rng(seed).permutation(len(train_x))
    val_idx, fit_idx = order[:300], order[300:]
    model = DigitsCNN()
    variables = model.init(jax.random.key(seed), train_x[:1])
    variables = _train(model, variables, train_x, train_y, epochs=epochs, lr=2e-3, batch=32,
                       seed=seed)
    full_acc = _accuracy(model, variables, test_x, test_y)
    full_pred = _predictions(model, variables, test_x)
    log(f"digits CNN: full-rank test accuracy {100 * full_acc:.2f}% after {epochs} epochs")
    calib = train_x[fit_idx[:512]]
    val_eval = functools.partial(_neg_loss, images=train_x[val_idx], labels=train_y[val_idx])
    rows = []
    for target in targets:
        for method in METHODS:
            result = _compress(model, variables, method, target, calib, val_eval,
                               train_x[:2])
            acc = _accuracy(result.module, result.variables, test_x, test_y)
            agree = float((_predictions(result.module, result.variables, test_x)
                           == full_pred).mean())
            tuned = _train(result.module, result.variables, train_x, train_y,
                           epochs=finetune_epochs, lr=5e-4, batch=32, seed=seed + 1)
            acc_ft = _accuracy(result.module, tuned, test_x, test_y)
            rows.append({"target": target, "method": method,
                         "speedup": result.report.net.speedup, "ranks": result.ranks,
                         "test_accuracy": acc, "agreement": agree,
                         "test_accuracy_finetuned": acc_ft,
                         "accuracy_drop_points": 100 * (full_acc - acc)})
            log(f"  {target:.1f}x {method:<26} speedup {result.report.net.speedup:5.2f}x  "
                f"accuracy {100 * acc:6.2f}% (drop {100 * (full_acc - acc):5.2f} pts)  "
                f"agreement {100 * agree:6.2f}%  after fine-tune {100 * acc_ft:6.2f}%")
    return {"full_test_accuracy": full_acc, "epochs": epochs,
            "finetune_epochs": finetune_epochs, "num_train": len(train_x),
            "num_test": len(test_x), "validation": len(val_idx), "calibration": len(calib),
            "rows": rows}


def modern_study(log, *, target=2.0, epochs=12, seed=0) -> dict:
    """A small bottleneck ResNet (1x1 convs, batch norm) and an MLP-Mixer (dense layers) trained
    on the digits, compressed at ``target`` times fewer multiply-adds of the whole net by each
    method; test accuracy before any fine-tuning."""
    import jax

    from benchmarks.user_models import Mixer, small_bottleneck_resnet
    from lrjax import data

    ds = data.load_dataset("digits")
    train_x, train_y = ds.as_arrays("train")
    test_x, test_y = ds.as_arrays("test")
    order = np.random.default_rng(seed).permutation(len(train_x))
    val_idx, fit_idx = order[:300], order[300:]
    calib = train_x[fit_idx[:256]]
    val_eval = functools.partial(_neg_loss, images=train_x[val_idx], labels=train_y[val_idx])
    out = {}
    for name, model in (("bottleneck ResNet", small_bottleneck_resnet(num_classes=10)),
                        ("MLP-Mixer", Mixer())):
        variables = model.init(jax.random.key(seed), train_x[:1], train=False)
        variables = _train(model, variables, train_x, train_y, epochs=epochs, lr=2e-3,
                           batch=32, seed=seed)
        full_acc = _accuracy(model, variables, test_x, test_y)
        log(f"{name}: full-rank test accuracy {100 * full_acc:.2f}% after {epochs} epochs")
        rows = []
        for method in METHODS:
            result = _compress(model, variables, method, target, calib, val_eval,
                               train_x[:2])
            acc = _accuracy(result.module, result.variables, test_x, test_y)
            kinds = {k: list(v) for k, v in result.report.by_kind().items()}
            split = {k: sum(1 for p in result.ranks if result.report.kinds[p] == k)
                     for k in ("kxk", "1x1", "dense")}
            rows.append({"method": method, "speedup": result.report.speedup,
                         "test_accuracy": acc, "accuracy_drop_points": 100 * (full_acc - acc),
                         "layers_split_by_kind": split, "macs_by_kind": kinds,
                         "ranks": result.ranks})
            log(f"  {name} {target:.1f}x {method:<26} whole-net speedup "
                f"{result.report.speedup:5.2f}x  accuracy {100 * acc:6.2f}% (drop "
                f"{100 * (full_acc - acc):5.2f} pts)  split {split}")
        out[name] = {"full_test_accuracy": full_acc, "epochs": epochs, "rows": rows}
    return {"target": target, "calibration": len(calib), "validation": len(val_idx),
            "models": out}


def resnet_study(targets, log, *, seed=0) -> dict:
    import jax
    import jax.numpy as jnp

    from benchmarks.user_models import resnet18
    from lrjax.surgery import decompose_linen

    model = resnet18(num_classes=100)
    x = jax.random.normal(jax.random.key(seed), (96, 64, 64, 3))
    calib, held_out, stats_batch = x[:32], x[32:64], x[64:]
    variables = model.init(jax.random.key(seed + 1), x[:1], train=False)
    # random weights that exercise every layer: the second batch norm of each block starts at
    # scale 0 (the Flax examples' init, which silences every residual branch), so set all scales
    # to 1, then estimate the running statistics on random images, as a trained net would have
    params = jax.tree.map(lambda p: p, variables["params"])
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.ones_like(p) if path[-1].key == "scale" else p, params)
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    for _ in range(30):  # momentum 0.9: the statistics converge to the batch's
        _, updates = model.apply(variables, stats_batch, train=True, mutable=["batch_stats"])
        variables = {"params": params, "batch_stats": updates["batch_stats"]}
    want = model.apply(variables, held_out, train=False)
    rows = []
    for target in targets:
        for method in METHODS[:2]:
            kwargs = {} if method == "data-free" else {"calibration": [calib[:16], calib[16:]]}
            result = decompose_linen(model, variables, x[:1], rule=f"speedup:{target}",
                                     train=False, **kwargs)
            got = result.module.apply(result.variables, held_out, train=False)
            err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
            agree = float((jnp.argmax(got, -1) == jnp.argmax(want, -1)).mean())
            rows.append({"target": target, "method": method,
                         "speedup": result.report.net.speedup, "relative_logit_error": err,
                         "agreement": agree})
            log(f"  ResNet-18 {target:.1f}x {method:<12} speedup "
                f"{result.report.net.speedup:5.2f}x  logit error {err:.3f}  agreement "
                f"{100 * agree:5.1f}%")
    return {"input": [64, 64, 3], "held_out": int(held_out.shape[0]), "rows": rows}


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    digits = result["digits"]
    for method in METHODS:
        rows = [r for r in digits["rows"] if r["method"] == method]
        s = [r["speedup"] for r in rows]
        axes[0].plot(s, [100 * r["test_accuracy"] for r in rows], "o-", label=f"{method}")
        axes[0].plot(s, [100 * r["test_accuracy_finetuned"] for r in rows], "x--",
                     label=f"{method}, fine-tuned")
    axes[0].axhline(100 * digits["full_test_accuracy"], color="k", lw=0.8, label="full rank")
    axes[0].set(xlabel="theoretical speedup (conv MACs)", ylabel="test accuracy (%)",
                title="digits CNN (trained here)")
    for method in METHODS[:2]:
        rows = [r for r in result["resnet18"]["rows"] if r["method"] == method]
        axes[1].plot([r["speedup"] for r in rows], [r["relative_logit_error"] for r in rows],
                     "o-", label=method)
    axes[1].set(xlabel="theoretical speedup (conv MACs)", ylabel="relative logit error",
                title="ResNet-18, random weights")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    common.setup()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--only-modern", action="store_true",
                        help="only the bottleneck ResNet and MLP-Mixer study")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    targets = tuple(float(t) for t in args.targets.split(","))
    log = functools.partial(print, flush=True)
    result = {"machine": common.machine(),
              "modern": modern_study(log, epochs=args.epochs)}
    if args.only_modern:
        if args.json:
            common.write_json(args.json, result)
        return result
    result["digits"] = digits_study(targets, log, epochs=args.epochs,
                                    finetune_epochs=args.finetune_epochs)
    if not args.skip_resnet:
        result["resnet18"] = resnet_study(targets, log)
    two = [r for r in result["digits"]["rows"] if r["target"] == 2.0]
    if two:
        best = {r["method"]: r["accuracy_drop_points"] for r in two}
        log(f"at 2x: accuracy drop before fine-tuning (points): {best}")
        result["target_2x_drop_points"] = best
    if args.json:
        common.write_json(args.json, result)
    if args.plot and not args.skip_resnet:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
