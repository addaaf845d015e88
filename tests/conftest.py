"""Eight host CPU devices for the multi-device tests; set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _forget_tuned_plans():
  """Plans remembered by `jaxtile.autotune` are process-global: no test sees another's."""
  yield
  from jaxtile._src import plan
  plan.tuned_blocks().clear()
