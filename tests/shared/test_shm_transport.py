"""The CPU transport: files in a /dev/shm directory, filled from a LoRA, mapped read-only."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

import msgpack
import pytest
import torch
from safetensors.torch import save_file

from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.packing import PackedLayout, pack
from loracache.shared.safetensors_header import SafetensorsHeader, read_header
from loracache.shared.transport import Segment, open_handle
from loracache.shared.transport.shm import ShmBuffer, ShmTransport, open_shm_handle

TENSORS = {
    "a.lora_down.weight": torch.randn(4, 33).half(),  # 264 bytes: the next one needs padding
    "a.lora_up.weight": torch.randn(17, 4).bfloat16(),
    "a.alpha": torch.tensor(8.0),
    "b.lora_down.weight": torch.randn(3, 3, 3, 2),
}


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture
def umask() -> Iterator[None]:
    """The usual service umask, so the modes the transport asks for are the modes it gets."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def shm_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="lc-unit-", dir="/dev/shm"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def transport(shm_root: Path, umask: None) -> Iterator[ShmTransport]:
    transport = ShmTransport(shm_root / "instance")
    yield transport
    if transport.directory.exists():
        transport.close()


@pytest.fixture
def lora(tmp_path: Path) -> Path:
    path = tmp_path / "lora.safetensors"
    save_file(TENSORS, str(path))
    return path


def load(transport: ShmTransport, path: Path,
         name: str = "entry") -> tuple[ShmBuffer, SafetensorsHeader, PackedLayout]:
    with open(path, "rb") as f:
        header = read_header(f)
        layout = pack(header.tensors)
        buffer = transport.allocate(layout.nbytes, name)
        buffer.fill(f, [Segment(src=r.begin, dst=s.offset, nbytes=r.nbytes)
                        for r, s in zip(header.tensors, layout.specs)])
    return buffer, header, layout


def mappings_of(path: Path) -> list[str]:
    """Permission fields of this process's mappings of ``path``."""
    perms = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") == str(path):
                perms.append(fields[1])
    return perms


def test_allocate_makes_a_private_file_of_the_size(transport: ShmTransport) -> None:
    buffer = transport.allocate(4096, "e1")
    assert buffer.path.parent == transport.directory
    assert buffer.nbytes == 4096
    info = buffer.path.stat()
    assert info.st_size == 4096
    assert stat.S_IMODE(info.st_mode) == 0o640
    assert info.st_blocks * 512 >= 4096  # reserved now, not at first write


def test_directory_mode_is_0750(transport: ShmTransport) -> None:
    assert stat.S_IMODE(transport.directory.stat().st_mode) == 0o750


def test_directory_must_be_new(transport: ShmTransport) -> None:
    with pytest.raises(FileExistsError):
        ShmTransport(transport.directory)


def test_mapped_buffer_holds_the_tensors_at_their_offsets(transport: ShmTransport,
                                                          lora: Path) -> None:
    buffer, header, layout = load(transport, lora)
    view = open_shm_handle(buffer.export())
    assert view.dtype == torch.uint8
    assert view.shape == (layout.nbytes,)
    content = view.numpy().tobytes()
    for record, spec in zip(header.tensors, layout.specs):
        assert content[spec.offset:spec.offset + record.nbytes] == as_bytes(TENSORS[spec.name])
    covered = set()
    for record, spec in zip(header.tensors, layout.specs):
        covered.update(range(spec.offset, spec.offset + record.nbytes))
    assert all(content[i] == 0 for i in range(layout.nbytes) if i not in covered)  # padding


def test_open_handle_dispatches_to_shm(transport: ShmTransport, lora: Path) -> None:
    buffer, _, _ = load(transport, lora)
    assert torch.equal(open_handle(buffer.export()), open_shm_handle(buffer.export()))


def test_handle_survives_msgpack(transport: ShmTransport) -> None:
    handle = transport.allocate(512, "e1").export()
    assert handle["kind"] == "shm"
    assert msgpack.unpackb(msgpack.packb(handle, use_bin_type=True)) == handle


def test_mapping_is_read_only(transport: ShmTransport, lora: Path) -> None:
    buffer, _, _ = load(transport, lora)
    view = open_shm_handle(buffer.export())
    perms = mappings_of(buffer.path.resolve())
    assert perms, "the file should be mapped in this process"
    assert all("w" not in p for p in perms), perms
    del view


def test_free_unlinks_and_existing_mapping_stays_readable(transport: ShmTransport,
                                                          lora: Path) -> None:
    buffer, header, layout = load(transport, lora)
    view = open_shm_handle(buffer.export())
    buffer.free()
    assert not buffer.path.exists()
    content = view.numpy().tobytes()
    for record, spec in zip(header.tensors, layout.specs):
        assert content[spec.offset:spec.offset + record.nbytes] == as_bytes(TENSORS[spec.name])
    buffer.free()  # a second free is harmless


def test_opening_a_freed_handle_is_mapping_failed(transport: ShmTransport) -> None:
    buffer = transport.allocate(512, "e1")
    handle = buffer.export()
    buffer.free()
    with pytest.raises(LoraCacheError) as info:
        open_shm_handle(handle)
    assert info.value.code is ErrorCode.MAPPING_FAILED
    assert handle["path"] in info.value.message


def test_fill_past_end_of_file_is_invalid_lora(transport: ShmTransport, lora: Path) -> None:
    size = lora.stat().st_size
    buffer = transport.allocate(512, "e1")
    with open(lora, "rb") as f, pytest.raises(LoraCacheError) as info:
        buffer.fill(f, [Segment(src=size - 4, dst=0, nbytes=16)])
    assert info.value.code is ErrorCode.INVALID_LORA
    assert "truncated" in info.value.message


def test_unknown_handle_kind_is_bad_request() -> None:
    with pytest.raises(LoraCacheError) as info:
        open_handle({"kind": "rdma", "path": "/x"})
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_close_removes_the_directory_and_leftover_files(transport: ShmTransport,
                                                        lora: Path) -> None:
    load(transport, lora, "e1")
    load(transport, lora, "e2")
    transport.close()
    assert not transport.directory.exists()


def test_device_and_total_memory(transport: ShmTransport) -> None:
    assert transport.device == "cpu"
    assert transport.total_memory() == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
