"""Shared test set-up: CPU by default, a `gpu` marker that skips without a GPU, and on
machines without one XLA's cheapest backend optimization."""

import glob
import os

# Compiling dominates this suite on a CPU (interpret-mode kernels, 30-layer models) and
# little of it runs long, so there XLA's backend skips its optimization passes: the suite
# takes about a quarter less time. Machines with an NVIDIA GPU keep XLA's defaults, so the
# GPU-only tests check what users run. Set before JAX creates a backend, which reads
# XLA_FLAGS once; notebooks run by nbmake inherit it.
if not glob.glob("/dev/nvidia*"):  # the device nodes of NVIDIA's driver
    os.environ["XLA_FLAGS"] = " ".join(
        filter(None, (os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"))
    )

import jax  # noqa: E402
import pytest  # noqa: E402


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
