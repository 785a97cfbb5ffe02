"""Device names: a GPU named with either prefix (a process without NVML cannot tell a MIG
instance from a GPU) is the same device."""

from __future__ import annotations

import pytest

from loracache.shared.device_names import bare_uuid, same_device

UUID = "8f3c0a52-1d2e-4b6f-9a0c-3e5d7f9b1c24"


@pytest.mark.parametrize("name", [f"GPU-{UUID}", f"MIG-{UUID}", UUID])
def test_bare_uuids_drop_the_prefix(name):
    assert bare_uuid(name) == UUID


def test_same_device_compares_gpus_bare_and_nothing_else():
    assert same_device(f"cuda:GPU-{UUID}", f"cuda:MIG-{UUID}")
    assert same_device("cpu", "cpu")
    assert not same_device(f"cuda:GPU-{UUID}", "cuda:GPU-00000000-0000-0000-0000-000000000000")
    assert not same_device("cpu", f"cuda:GPU-{UUID}")
