"""One process of the multi-host check in `test_multihost.py`: a tiled conv over a global mesh.

Run as

  python tests/multihost_worker.py --coordinator 127.0.0.1:PORT --num-processes 2 \\
      --process-id I --out PATH

once per process. Each process gets `LOCAL_DEVICES` host CPU devices, joins JAX's distributed
runtime (CPU collectives over gloo), builds one `Mesh` over every process's devices and runs each
case of `CASES` through `jaxtile.tile_convs(..., devices=mesh)`. The inputs are the same
deterministic NumPy arrays on every process, placed on the mesh as global replicated arrays. The
tiled output (and, for comparison, the untiled conv run on the same mesh) is gathered to every
host; process 0 writes them with the plans' `pieces_per_device` to `--out` (an .npz file).

Exit status: 0 on success; `UNAVAILABLE` (with the reason on stderr) when this jax cannot run
multi-process CPU programs (no `jax.distributed`, no gloo CPU collectives); `PORT_TAKEN` when
process 0 could not start the coordinator service on the given port; anything else on failure.

Importing this module has no side effects and does not import jax: the test imports it for
`CASES` and `inputs` to compute the single-process results itself.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import traceback

import numpy as np

#: Host CPU devices per process.
LOCAL_DEVICES = 4
#: Exit status meaning "multi-process CPU JAX is not available here"; the reason is on stderr.
UNAVAILABLE = 77
#: Exit status of process 0 when the coordinator could not bind its port (worth a new port).
PORT_TAKEN = 75
#: Name of the global mesh's axis.
AXIS = "x"
DN = ("NHWC", "HWIO", "NHWC")

#: name -> (lhs shape NHWC, rhs shape HWIO, padding, tile_convs policy keywords). Every case is
#: tiled explicitly, so it is rewritten whatever the budget.
CASES = {
    # 8 row tiles of 4 rows: one tile per device.
    "rows8": ((1, 32, 32, 4), (3, 3, 4, 6), "SAME", dict(tile_shape=(4, 32))),
    # 7 row tiles of 5 rows on 8 devices: the last device recomputes the final tile, whose
    # copy is dropped (its pieces_per_device entry is 0).
    "rows7": ((1, 32, 32, 4), (3, 3, 4, 6), "SAME", dict(tile_shape=(5, 32))),
    # 11 row tiles of 3 rows: 2 per device, the last devices get fewer.
    "rows11": ((1, 32, 32, 4), (3, 3, 4, 6), "SAME", dict(tile_shape=(3, 32))),
    # 8 output-channel blocks of 2 channels, VALID padding.
    "cout8": ((1, 12, 12, 4), (3, 3, 4, 16), "VALID", dict(channel_block=(None, 2))),
    # Row tiles again, output left sharded over the processes' devices.
    "rows8_sharded": ((1, 32, 32, 4), (3, 3, 4, 6), "SAME",
                      dict(tile_shape=(4, 32), shard_output=True)),
}


def inputs(name: str) -> tuple[np.ndarray, np.ndarray]:
  """The deterministic float32 (lhs, rhs) of case `name`, the same in every process."""
  lhs_shape, rhs_shape, _, _ = CASES[name]
  rng = np.random.default_rng(sorted(CASES).index(name))
  lhs = rng.standard_normal(lhs_shape).astype(np.float32)
  rhs = (rng.standard_normal(rhs_shape) / np.sqrt(np.prod(rhs_shape[:3]))).astype(np.float32)
  return lhs, rhs


def conv_fn(name: str):
  """The plain conv of case `name`, as a function of (lhs, rhs)."""
  from jax import lax
  padding = CASES[name][2]

  def conv(lhs, rhs):
    return lax.conv_general_dilated(lhs, rhs, (1, 1), padding, dimension_numbers=DN)
  return conv


def _set_device_count() -> None:
  """This process's `LOCAL_DEVICES` host devices, replacing any inherited device-count flag."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={LOCAL_DEVICES}")
  os.environ["XLA_FLAGS"] = " ".join(flags)
  os.environ.pop("JAX_NUM_CPU_DEVICES", None)
  os.environ["JAX_PLATFORMS"] = "cpu"


def _unavailable(reason: str) -> None:
  print(f"multihost_worker: UNAVAILABLE: {reason}", file=sys.stderr, flush=True)
  sys.exit(UNAVAILABLE)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--coordinator", required=True, help="HOST:PORT of process 0's service")
  parser.add_argument("--num-processes", type=int, required=True)
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--out", required=True, help=".npz file process 0 writes")
  parser.add_argument("--timeout", type=int, default=60,
                      help="seconds to wait for the other processes at start-up and shutdown")
  args = parser.parse_args(argv)
  faulthandler.enable()  # a crash in jaxlib prints the Python stacks too
  if hasattr(signal, "SIGUSR1"):  # the test sends it before killing a hung worker
    faulthandler.register(signal.SIGUSR1, all_threads=True)

  _set_device_count()
  import jax  # pylint: disable=g-import-not-at-top

  if not hasattr(jax, "distributed") or not hasattr(jax.distributed, "initialize"):
    _unavailable(f"jax {jax.__version__} has no jax.distributed.initialize")
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception as e:  # an unknown option or value: this jax has no gloo CPU collectives
    _unavailable(f"jax {jax.__version__} rejects jax_cpu_collectives_implementation='gloo': "
                 f"{type(e).__name__}: {e}")
  try:
    from jax._src.lib import _jax as xla_ext  # pylint: disable=g-import-not-at-top
  except ImportError:  # laid out differently: let initialize say whether gloo is there
    xla_ext = None
  if xla_ext is not None and not hasattr(xla_ext, "make_gloo_tcp_collectives"):
    _unavailable(f"jaxlib {jax.lib.__version__} was built without gloo CPU collectives "
                 "(no make_gloo_tcp_collectives)")
  try:
    jax.distributed.initialize(
        coordinator_address=args.coordinator, num_processes=args.num_processes,
        process_id=args.process_id, coordinator_bind_address=args.coordinator,
        cluster_detection_method="deactivate", initialization_timeout=args.timeout,
        heartbeat_timeout_seconds=args.timeout, shutdown_timeout_seconds=args.timeout)
  except Exception as e:  # pylint: disable=broad-except
    if args.process_id == 0 and "Failed to start RPC server" in str(e):
      # The coordinator's port was taken between the test picking it and this bind.
      print(f"multihost_worker: PORT_TAKEN: {args.coordinator}: {e}", file=sys.stderr, flush=True)
      sys.exit(PORT_TAKEN)
    raise

  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  import jaxtile  # pylint: disable=g-import-not-at-top

  n_global = args.num_processes * LOCAL_DEVICES
  meta = dict(process_count=jax.process_count(), device_count=jax.device_count(),
              local_device_count=jax.local_device_count(),
              device_processes=[d.process_index for d in jax.devices()])
  assert meta["process_count"] == args.num_processes, meta
  assert meta["device_count"] == n_global and meta["local_device_count"] == LOCAL_DEVICES, meta

  mesh = Mesh(np.array(jax.devices()), (AXIS,))
  replicated = NamedSharding(mesh, P())

  def global_replicated(a: np.ndarray) -> jax.Array:
    return jax.make_array_from_callback(a.shape, replicated, lambda index: a[index])

  def gather(x: jax.Array) -> np.ndarray:
    # A global array (spanning both processes), gathered whole to this host.
    assert not x.is_fully_addressable, x.sharding
    return multihost_utils.process_allgather(x, tiled=True)

  results = {}
  for name, (_, _, _, policy) in CASES.items():
    lhs, rhs = (global_replicated(a) for a in inputs(name))
    conv = conv_fn(name)
    tiled = jaxtile.tile_convs(conv, devices=mesh, **policy)(lhs, rhs)
    plain = jax.jit(conv)(lhs, rhs)
    report = jaxtile.explain(conv, devices=mesh, **policy)(lhs, rhs)
    (c,) = report.convs
    results[f"{name}.tiled"] = gather(tiled)
    results[f"{name}.plain"] = gather(plain)
    results[f"{name}.pieces_per_device"] = np.asarray(c.plan.pieces_per_device, np.int64)
    results[f"{name}.n_elemental"] = np.asarray(c.plan.n_elemental, np.int64)
    results[f"{name}.tiled_addressable_shards"] = np.asarray(
        len(tiled.addressable_shards), np.int64)
    results[f"{name}.tiled_fully_addressable"] = np.asarray(tiled.is_fully_addressable)
    results[f"{name}.tiled_fully_replicated"] = np.asarray(tiled.sharding.is_fully_replicated)

  # Every process must have gathered the same arrays; a mismatch raises here, in every process.
  multihost_utils.assert_equal(
      {k: v for k, v in results.items() if k.endswith(".tiled")}, "gathered results differ")
  if args.process_id == 0:
    results["meta"] = np.asarray(json.dumps(meta))
    tmp = args.out + ".tmp.npz"
    np.savez(tmp, **results)
    os.replace(tmp, args.out)
  multihost_utils.sync_global_devices("multihost_worker done")
  print(f"multihost_worker {args.process_id}: ok {meta}", flush=True)
  return 0


if __name__ == "__main__":
  try:
    status = main()
  except Exception:  # pylint: disable=broad-except
    # Exit now: a normal exit would first wait (up to --timeout) at the distributed runtime's
    # shutdown barrier for the other processes, which may be blocked waiting for this one.
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  sys.exit(status)
