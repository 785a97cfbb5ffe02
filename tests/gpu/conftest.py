"""tests/gpu runs with `make test-gpu`, which fails when no CUDA device is usable; elsewhere
(`make test` on a machine without one) these tests are deselected, not skipped."""

from __future__ import annotations

import os

import pytest
import torch


def cuda_problem() -> str | None:
    """Why CUDA is not usable here, or None when a device allocates."""
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    try:
        torch.empty(1, device="cuda:0")
    except RuntimeError as exc:
        return f"allocating on cuda:0 failed: {exc}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu = [item for item in items if "tests/gpu/" in str(item.path)]
    if not gpu:
        return
    problem = cuda_problem()
    if problem is None:
        return
    if os.environ.get("LORACACHE_REQUIRE_GPU"):
        raise pytest.UsageError(f"make test-gpu needs a usable CUDA device: {problem}")
    config.hook.pytest_deselected(items=gpu)
    items[:] = [item for item in items if item not in gpu]
