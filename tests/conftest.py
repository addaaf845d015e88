"""Eight host CPU devices for the multi-device tests; set before jax is imported anywhere.

XLA:CPU's backend compiles at LLVM optimization level 0 here, unless `XLA_FLAGS` says otherwise:
most of the suite's time is compiling small programs, most of compiling is LLVM, and what the
tests check is decided before LLVM runs. jaxtile's rewrite and XLA's HLO passes, fusion and
buffer assignment (the temporaries the memory tests assert) are the same at every level; only
the machine code differs (the whole suite on 2 cores: 819 s against 935 s at the default
level). The benchmarks run at XLA's default level, as users do, and so do the gradient
workers (`test_gradients.py`), which check that no gradient aborts the process.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    ["--xla_backend_optimization_level=0", os.environ.get("XLA_FLAGS", ""),
     "--xla_force_host_platform_device_count=8"]).strip()
