"""The packed layout: aligned, in order, without overlaps, and no bigger than alignment needs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loracache.shared.packing import ALIGNMENT, pack
from loracache.shared.protocol import TensorSpec
from loracache.shared.safetensors_header import TensorRecord


def records(sizes: list[int]) -> list[TensorRecord]:
    """U8 tensors of the given byte sizes, laid out back to back in a file."""
    result, begin = [], 100
    for i, size in enumerate(sizes):
        result.append(TensorRecord(name=f"t{i}", dtype="U8", shape=(size,), begin=begin,
                                   end=begin + size))
        begin += size
    return result


def test_alignment_is_256() -> None:
    assert ALIGNMENT == 256


def test_known_layout() -> None:
    layout = pack(records([10, 256, 0, 1]))
    assert [s.offset for s in layout.specs] == [0, 256, 512, 512]
    assert layout.nbytes == 768


def test_specs_carry_name_dtype_and_shape() -> None:
    record = TensorRecord(name="a.lora_up.weight", dtype="BF16", shape=(320, 4), begin=8,
                          end=8 + 320 * 4 * 2)
    assert pack([record]).specs == [TensorSpec("a.lora_up.weight", "BF16", [320, 4], 0)]


@pytest.mark.parametrize("sizes", [[], [0], [0, 0]], ids=["none", "one-empty", "two-empty"])
def test_buffer_is_never_empty(sizes: list[int]) -> None:
    # A zero-byte buffer cannot be mapped (mmap refuses empty files).
    assert pack(records(sizes)).nbytes == ALIGNMENT


@given(st.lists(st.integers(0, 3 * ALIGNMENT), max_size=30))
def test_layout_properties(sizes: list[int]) -> None:
    recs = records(sizes)
    layout = pack(recs)
    offsets = [s.offset for s in layout.specs]

    assert [s.name for s in layout.specs] == [r.name for r in recs]  # order preserved
    assert all(offset % ALIGNMENT == 0 for offset in offsets)
    assert layout.nbytes % ALIGNMENT == 0
    for (offset, size), next_offset in zip(zip(offsets, sizes), offsets[1:]):
        assert offset + size <= next_offset  # no overlap
        assert next_offset - (offset + size) < ALIGNMENT  # no more padding than alignment needs
    if sizes:
        assert offsets[-1] + sizes[-1] <= layout.nbytes  # covers the last tensor
        assert layout.nbytes - (offsets[-1] + sizes[-1]) < ALIGNMENT or sum(sizes) == 0
