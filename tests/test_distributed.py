"""Training over several processes, tested here with local CPU processes: two processes with one
CPU device each (gloo collectives, ``jax.distributed``) on the offline digits config run the
computation of one process with one device (up to reduction order), write one checkpoint, and
resume it. (A mesh over two devices of one process, the same sharded program without
``jax.distributed``, is not run here: a third training process cost the 2-core suite ~10 s.)"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from unittest import mock

import jax
import numpy as np
import pytest
from flax import traverse_util

from lrjax import checkpoint, data, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# one training run: tiny CNN on digits, its final parameters (this process's replica) and facts
SCRIPT = """
import json, os, signal, sys, time
import numpy as np
import jax
from flax import traverse_util
from lrjax import train
from tests.helpers import after_each_step
from tests.test_distributed import digits_config

workdir, out, epochs, processes, pid, port, die_at = sys.argv[1:8]
if int(die_at):  # this process dies (SIGKILL) after that step, once the first checkpoint is in
    def die_after(step):
        if step == int(die_at):
            while not os.path.exists(os.path.join(workdir, "checkpoints", "4")):
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)

    train.setup = after_each_step(train.setup, die_after)
r = train.train_and_evaluate(digits_config(int(epochs), int(processes), int(pid), port), workdir)
flat = traverse_util.flatten_dict(r.state.params, sep="/")
np.savez(out, **{k: np.asarray(v.addressable_data(0)) for k, v in flat.items()})
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                  "devices": jax.device_count(), "status": r.status,
                  "history": r.history}))
"""


def digits_config(epochs: int, processes: int = 1, pid: int = 0, port: str = "0"):
    """A tiny CNN on the offline digits (the README's main job, shortened), as ``processes``
    processes of a ``jax.distributed`` run when more than one."""
    from experiments.configs import cifar_nin

    c = cifar_nin.get_config("local")
    c.model, c.lowrank, c.bn = "cnn", True, True
    c.batch_size, c.eval_batch_size, c.steps_per_epoch = 32, 50, 4
    c.num_epochs, c.lr_boundaries_epochs, c.lr_values = epochs, (), (0.01,)
    c.progress = False
    c.log_every_steps, c.checkpoint_every_epochs = 2, 1
    if processes > 1:
        c.multihost, c.coordinator_address = True, f"localhost:{port}"
        c.num_processes, c.process_id, c.heartbeat_timeout_seconds = processes, pid, 10
    return c


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir, out, epochs, processes, devices, pid=0, port=0, die_at=0):
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                                     f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(workdir), str(out), str(epochs),
                             str(processes), str(pid), str(port), str(die_at)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=300) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()  # a failed peer must not leave this one waiting
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _params(path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_digits_shards_are_disjoint_and_cover_each_global_batch():
    """Each process takes its rows of every global batch: together, the single-process batch."""
    whole = next(data.load_dataset("digits").train_batches(32, seed=3, start_batch=5))
    parts, tests = [], []
    for index in range(2):
        with mock.patch.object(jax, "process_index", return_value=index), \
                mock.patch.object(jax, "process_count", return_value=2):
            shard = data.load_dataset("digits")
        parts.append(next(shard.train_batches(16, seed=3, start_batch=5)))
        tests.append(shard.as_arrays("test")[1])
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])
    np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), whole["label"])
    full_test = data.load_dataset("digits").as_arrays("test")[1]
    assert len(tests[0]) + len(tests[1]) == len(full_test)  # the test split, split in two
    assert sorted(np.concatenate(tests)) == sorted(full_test)


@pytest.mark.slow
def test_two_processes_match_one_device_and_resume(tmp_path):
    """Two processes (one CPU device each) train the digits config; one of them dies (SIGKILL)
    in the second epoch, after the first epoch's checkpoint: the other exits with JAX's
    heartbeat error within seconds (no hang; this process, meanwhile, trains the same run on one
    device). A rerun of the pair resumes from that checkpoint and ends where that one-device run
    ends (data parallelism over processes is the single-device computation: gradients averaged,
    not summed; every process holds the same parameters; one checkpoint per epoch, written once
    for both)."""
    port = _port()
    ckpts = tmp_path / "multi" / "checkpoints"
    procs = [_launch(tmp_path / "multi", tmp_path / f"p{i}.npz", 2, 2, 1, i, port,
                     die_at=6 * i) for i in range(2)]
    survivor = {}

    def wait_for_survivor():  # while this process trains alone (below)
        survivor["err"] = procs[0].communicate(timeout=120)[1]
        survivor["exited"] = time.monotonic()

    try:
        procs[1].communicate(timeout=240)
        killed = time.monotonic()
        assert procs[1].returncode == -signal.SIGKILL
        waiter = threading.Thread(target=wait_for_survivor)
        waiter.start()
        assert jax.device_count() == 1  # meanwhile, this process with one device
        one_device = train.train_and_evaluate(digits_config(2), str(tmp_path / "one_device"))
        waiter.join()
        assert procs[0].returncode != 0 and "heartbeat timeout" in survivor["err"]
        assert survivor["exited"] - killed < 60
    finally:
        for p in procs:
            p.kill()
    port = _port()
    procs = [_launch(tmp_path / "multi", tmp_path / f"q{i}.npz", 2, 2, 1, i, port)
             for i in range(2)]
    resumed = [_finish(p) for p in procs]
    written = checkpoint.TrainCheckpoints(str(ckpts), fingerprint={}).all_steps()
    assert written and written[0] == 4  # one checkpoint per epoch, written once for both
    assert [(r["process"], r["processes"], r["devices"]) for r in resumed] == [(0, 2, 2),
                                                                               (1, 2, 2)]
    assert all(r["status"] == "completed" for r in resumed)
    assert [len(r["history"]) for r in resumed] == [2, 2]  # epoch 1 restored (2 if written)
    np.testing.assert_allclose(  # 8 steps of float reduction-order noise: ~0.3%
        [(h["train_loss"], h["test_loss"]) for h in resumed[0]["history"]],
        [(h["train_loss"], h["test_loss"]) for h in one_device.history], rtol=5e-3)
    q0, q1 = (_params(tmp_path / n) for n in ("q0.npz", "q1.npz"))
    alone = traverse_util.flatten_dict(jax.device_get(one_device.state.params), sep="/")
    for key in q0:  # the processes hold the same parameters, those of the one-device run up
        np.testing.assert_array_equal(q0[key], q1[key])  # to reduction-order noise (~1e-3)
        np.testing.assert_allclose(q0[key], alone[key], rtol=0, atol=5e-3, err_msg=key)
    gap = np.sqrt(sum(np.sum((q0[k] - alone[k]) ** 2) for k in q0))
    assert gap < 1e-2 * np.sqrt(sum(np.sum(alone[k] ** 2) for k in q0))  # measured: 0.25%
    assert max(checkpoint.TrainCheckpoints(str(ckpts), fingerprint={}).all_steps()) == 8
