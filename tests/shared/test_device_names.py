"""Device names: a GPU named with either prefix (a process without NVML cannot tell a MIG
instance from a GPU) is the same device."""

from __future__ import annotations

import pytest

from loracache.shared.device_names import bare_uuid, is_name, is_selector, same_device, selects

UUID = "8f3c0a52-1d2e-4b6f-9a0c-3e5d7f9b1c24"


@pytest.mark.parametrize("name", [f"GPU-{UUID}", f"MIG-{UUID}", UUID])
def test_bare_uuids_drop_the_prefix(name):
    assert bare_uuid(name) == UUID


def test_same_device_compares_gpus_bare_and_nothing_else():
    assert same_device(f"cuda:GPU-{UUID}", f"cuda:MIG-{UUID}")
    assert same_device("cpu", "cpu")
    assert not same_device(f"cuda:GPU-{UUID}", "cuda:GPU-00000000-0000-0000-0000-000000000000")
    assert not same_device("cpu", f"cuda:GPU-{UUID}")


@pytest.mark.parametrize("selector, name, index, picked", [
    ("all", "cpu", None, True), ("all", f"cuda:GPU-{UUID}", 0, True),
    ("cpu", "cpu", None, True), ("cpu", f"cuda:GPU-{UUID}", 0, False),
    ("cuda", f"cuda:GPU-{UUID}", 1, True), ("cuda", "cpu", None, False),
    ("cuda:1", f"cuda:GPU-{UUID}", 1, True), ("cuda:0", f"cuda:GPU-{UUID}", 1, False),
    (f"cuda:MIG-{UUID}", f"cuda:GPU-{UUID}", 0, True),
    ("cuda:GPU-00000000-0000-0000-0000-000000000000", f"cuda:GPU-{UUID}", 0, False)])
def test_selectors_pick_devices(selector, name, index, picked):
    assert selects(selector, name, index) is picked


@pytest.mark.parametrize("text, selector, name", [
    ("cpu", True, True), ("all", True, False), ("cuda", True, False), ("cuda:3", True, False),
    (f"cuda:GPU-{UUID}", True, True), (f"cuda:MIG-{UUID}", True, True),
    (f"cuda:{UUID}", True, False),  # bare, as torch prints it: a selector, not a name
    ("cuda:gpu0", False, False), ("gpu", False, False), (f"GPU-{UUID}", False, False)])
def test_what_counts_as_a_selector_and_as_a_name(text, selector, name):
    assert (is_selector(text), is_name(text)) == (selector, name)
