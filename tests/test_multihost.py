"""Multi-host: a tiled conv spread over a global mesh of 2 processes x 4 host CPU devices.

`tests/multihost_worker.py` is started twice on 127.0.0.1 (one JAX distributed runtime, gloo CPU
collectives); each process runs `CASES` through `tile_convs(..., devices=mesh)` over the 8-device
global mesh and process 0 writes the gathered outputs. Here they are compared with the results
of this (single) process: the plain conv under `jax.jit` and the single-device tiled conv.

The two processes run once per module (about 5 s), bounded by `TIMEOUT_S`, on a port picked
free just before; they are killed in every case before the fixture returns or fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtile

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
WORKER_PATH = TESTS / "multihost_worker.py"
N_PROCESSES = 2
#: Bound on one run of both processes, start to exit, in seconds.
TIMEOUT_S = 240
#: Attempts with a new port when process 0 could not bind the one picked.
PORT_ATTEMPTS = 3
RTOL = ATOL = 1e-5


def _load_worker():
  spec = importlib.util.spec_from_file_location("multihost_worker", WORKER_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


worker = _load_worker()
N_DEVICES = N_PROCESSES * worker.LOCAL_DEVICES


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _worker_env() -> dict[str, str]:
  """This process's environment for a worker: the repo importable, the worker's own device count
  (not the 8 of conftest.py), CPU only, and no proxy between the processes on 127.0.0.1."""
  env = {k: v for k, v in os.environ.items()
         if not k.lower().endswith("_proxy") and k != "JAX_NUM_CPU_DEVICES"}
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  if not env["XLA_FLAGS"]:
    del env["XLA_FLAGS"]
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _tail(path: Path, n: int = 4000) -> str:
  """The end of a worker's log, without gloo's per-rank connection chatter."""
  try:
    text = path.read_text(errors="replace")
  except OSError as e:
    return f"<unreadable: {e}>"
  lines = [line for line in text.splitlines() if not line.startswith("[Gloo]")]
  return "\n".join(lines)[-n:]


class _Run:
  """One launch of the worker processes; `.returncodes` None for one that had to be killed."""

  killed: list[int]

  def __init__(self, tmp: Path, attempt: int):
    self.port = _free_port()
    self.out = tmp / f"result{attempt}.npz"
    self.logs = [(tmp / f"worker{attempt}_{i}.stdout", tmp / f"worker{attempt}_{i}.stderr")
                 for i in range(N_PROCESSES)]
    self.returncodes: list = [None] * N_PROCESSES
    self.timed_out = False
    self.seconds = 0.0

  def launch(self, deadline: float) -> None:
    env = _worker_env()
    procs = []
    self.killed = []
    start = time.monotonic()
    try:
      for i, (stdout, stderr) in enumerate(self.logs):
        with open(stdout, "wb") as o, open(stderr, "wb") as e:
          procs.append(subprocess.Popen(
              [sys.executable, str(WORKER_PATH), "--coordinator", f"127.0.0.1:{self.port}",
               "--num-processes", str(N_PROCESSES), "--process-id", str(i),
               "--out", str(self.out), "--timeout", str(min(60, TIMEOUT_S // 2))],
              cwd=REPO, env=env, stdout=o, stderr=e, stdin=subprocess.DEVNULL))
      # Until all exit, one fails (the others would wait for it) or the deadline passes.
      while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
          break
        if time.monotonic() > deadline:
          self.timed_out = True
          break
        time.sleep(0.1)
    finally:
      running = [p for p in procs if p.poll() is None]
      if running and hasattr(signal, "SIGUSR1"):
        # Have each worker about to be killed print its threads' stacks (see the worker).
        for p in running:
          p.send_signal(signal.SIGUSR1)
        time.sleep(1)
      for i, p in enumerate(procs):
        if p in running:  # SIGUSR1 ends one that has not registered faulthandler yet
          self.killed.append(i)
          if p.poll() is None:
            p.kill()
      for p in procs:
        try:
          p.wait(timeout=30)
        except subprocess.TimeoutExpired:  # only if SIGKILL did not take: nothing more to do
          pass
      self.seconds = time.monotonic() - start
      self.returncodes = [None if i in self.killed else p.returncode
                          for i, p in enumerate(procs)]

  def port_taken(self) -> bool:
    """Whether process 0 failed because the coordinator's port was taken after it was picked."""
    code = self.returncodes[0]
    if code == worker.PORT_TAKEN:
      return True
    # jaxlib sometimes crashes (SIGSEGV) instead of raising after logging the failed bind.
    return code is not None and code < 0 and "Failed to add port to server" in _tail(
        self.logs[0][1], 20000)

  def report(self) -> str:
    parts = [f"port {self.port}, {self.seconds:.1f} s"
             + (f", timed out after {TIMEOUT_S} s" if self.timed_out else "")]
    for i, ((stdout, stderr), code) in enumerate(zip(self.logs, self.returncodes)):
      status = ("killed by the test (still running)" if code is None
                else f"exit status {code}" + (" (a signal)" if code < 0 else ""))
      parts.append(f"--- process {i}: {status}; stderr tail:\n{_tail(stderr)}"
                   f"\n--- process {i} stdout tail:\n{_tail(stdout, 1000)}")
    return "\n".join(parts)


@pytest.fixture(scope="module")
def multihost(tmp_path_factory):
  """The worker's results (a dict of arrays) and the seconds the processes ran."""
  if not hasattr(jax, "distributed") or not hasattr(jax.distributed, "initialize"):
    pytest.skip(f"jax {jax.__version__} has no jax.distributed.initialize")
  tmp = tmp_path_factory.mktemp("multihost")
  deadline = time.monotonic() + TIMEOUT_S
  for attempt in range(PORT_ATTEMPTS):
    run = _Run(tmp, attempt)
    run.launch(deadline)
    codes = run.returncodes
    if worker.UNAVAILABLE in codes:
      pytest.skip("multi-process CPU JAX unavailable: "
                  + _tail(run.logs[codes.index(worker.UNAVAILABLE)][1], 500).strip())
    if run.port_taken() and attempt + 1 < PORT_ATTEMPTS:
      continue
    break
  if run.timed_out or any(c != 0 for c in codes):
    pytest.fail("the 2-process run failed: " + run.report(), pytrace=False)
  if not run.out.exists():
    pytest.fail(f"process 0 exited 0 but wrote no {run.out}: " + run.report(), pytrace=False)
  with np.load(run.out) as f:
    results = {k: f[k] for k in f.files}
  results["meta"] = json.loads(str(results["meta"]))
  return results, run.seconds


def test_global_mesh(multihost):
  results, seconds = multihost
  meta = results["meta"]
  assert meta["process_count"] == N_PROCESSES, meta
  assert meta["device_count"] == N_DEVICES, meta
  assert sorted(set(meta["device_processes"])) == list(range(N_PROCESSES)), meta
  assert seconds < TIMEOUT_S


@pytest.mark.parametrize("name", sorted(worker.CASES))
def test_matches_single_process(multihost, name):
  results, _ = multihost
  lhs, rhs = (jnp.asarray(a) for a in worker.inputs(name))
  policy = dict(worker.CASES[name][3])
  policy.pop("shard_output", None)
  conv = worker.conv_fn(name)
  plain = np.asarray(jax.jit(conv)(lhs, rhs))
  single = np.asarray(jaxtile.tile_convs(conv, **policy)(lhs, rhs))

  tiled = results[f"{name}.tiled"]
  assert tiled.shape == plain.shape and tiled.dtype == plain.dtype, (tiled.shape, tiled.dtype)
  # The output spans both processes' devices, so the multi-process program really ran as one.
  assert not results[f"{name}.tiled_fully_addressable"]
  assert int(results[f"{name}.tiled_addressable_shards"]) == worker.LOCAL_DEVICES
  if worker.CASES[name][3].get("shard_output"):
    assert not results[f"{name}.tiled_fully_replicated"], "shard_output=True left it replicated"
  np.testing.assert_allclose(tiled, single, rtol=RTOL, atol=ATOL,
                             err_msg=f"{name}: 2-process tiled vs single-device tiled")
  np.testing.assert_allclose(tiled, plain, rtol=RTOL, atol=ATOL,
                             err_msg=f"{name}: 2-process tiled vs jit of the plain conv")
  np.testing.assert_allclose(results[f"{name}.plain"], plain, rtol=RTOL, atol=ATOL,
                             err_msg=f"{name}: 2-process plain conv vs jit of the plain conv")


@pytest.mark.parametrize("name", sorted(worker.CASES))
def test_pieces_per_device(multihost, name):
  results, _ = multihost
  pieces = tuple(int(p) for p in results[f"{name}.pieces_per_device"])
  n_elemental = int(results[f"{name}.n_elemental"])
  assert len(pieces) == N_DEVICES, pieces
  assert sum(pieces) == n_elemental, (pieces, n_elemental)
  assert n_elemental > 1 and min(pieces) >= 0, (pieces, n_elemental)
  # The plan depends on the device count only, not on how the devices are spread over processes.
  if jax.device_count() >= N_DEVICES:
    lhs, rhs = (jnp.asarray(a) for a in worker.inputs(name))
    report = jaxtile.explain(worker.conv_fn(name), devices=jax.devices()[:N_DEVICES],
                             **worker.CASES[name][3])(lhs, rhs)
    assert report.convs[0].plan.pieces_per_device == pieces
