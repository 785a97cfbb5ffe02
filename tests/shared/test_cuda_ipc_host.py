"""The host-side mechanics of the CUDA transport, pinned on CPU: torch's reference-counter
files (its CPU build makes files of the same allocator class), their permissions, segment
sizes and which torch releases can open which handles."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.ipc_compat import check_importer, handle_format
from loracache.shared.transport import cuda_ipc
from loracache.shared.transport.cuda_ipc import (MIN_SEGMENT, SEGMENT_ROUNDING, counter_path,
                                                 counter_value, segment_bytes)

SLOTS = 24


@pytest.fixture
def counter_file():
    """A file made by torch's RefcountedMapAllocator, as torch makes CUDA IPC counter files,
    with slot i holding 1000 + i. Yields its handle (the name torch sends)."""
    storage = torch.UntypedStorage._new_using_filename_cpu(8 * SLOTS)
    slots = torch.empty(0, dtype=torch.int64).set_(
        torch.TypedStorage(wrap_storage=storage, dtype=torch.int64, _internal=True), 0, (SLOTS,),
        (1,))
    slots.copy_(torch.arange(1000, 1000 + SLOTS))
    _, handle, _ = storage._share_filename_cpu_()
    yield handle
    del slots, storage


def test_counter_slots_are_read_past_torchs_header(counter_file):
    assert [counter_value(counter_file, i) for i in range(SLOTS)] == list(range(1000,
                                                                               1000 + SLOTS))


def test_a_counter_file_that_is_gone_reads_as_released():
    assert counter_value(b"/torch_0_no_such_file", 3) == 0


def test_counter_files_are_opened_to_the_group(counter_file):
    path = counter_path(counter_file)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # as torch creates them
    with cuda_ipc.IPC_LOCK:
        cuda_ipc._open_to_group(counter_file)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660


@pytest.mark.parametrize("nbytes, expected", [
    (1, MIN_SEGMENT), (MIN_SEGMENT, MIN_SEGMENT), (MIN_SEGMENT + 1, MIN_SEGMENT + SEGMENT_ROUNDING),
    (100 << 20, 100 << 20), ((100 << 20) + 512, 102 << 20)])
def test_entries_fill_segments_of_their_own(nbytes, expected):
    assert segment_bytes(nbytes) == expected


@pytest.mark.parametrize("release, fmt", [("2.3.1", 1), ("2.4.1+cu121", 1), ("2.5.0", 2),
                                          ("2.11.0+cu130", 2), ("3.0.0", 2), ("", None),
                                          ("nightly", None), ("9" * 5000 + ".1", None),
                                          ("2." + "9" * 5000, None)])
def test_handle_format_by_release(release, fmt):
    assert handle_format(release) == fmt


def test_workers_that_cannot_read_the_daemons_handles_are_refused():
    check_importer("2.4.1", "2.11.0")  # newer importers read bare handles
    check_importer("2.11.0", "2.5.1")
    check_importer("2.11.0", "")  # a client that does not say
    with pytest.raises(LoraCacheError) as refused:
        check_importer("2.11.0+cu130", "2.4.1+cu121")
    assert refused.value.code is ErrorCode.VERSION_MISMATCH
    assert "2.4.1+cu121" in refused.value.message and "2.11.0+cu130" in refused.value.message
