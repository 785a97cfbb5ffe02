"""A corpus of malformed safetensors files, each acquired through one live daemon.

Every file must be refused with INVALID_LORA and a message that names the file and the problem;
none may leave an entry, a lease, a reservation or a shared-memory file behind, and the daemon
must keep serving valid files. The parser itself has unit tests (tests/shared/
test_safetensors_header.py); these check what a client sees from the real daemon.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from loracache.client import ErrorCode, LoraCacheClient, LoraCacheError
from loracache.shared.safetensors_header import (
    MAX_DIM_SIZE,
    MAX_DIMS,
    MAX_HEADER_BYTES,
    MAX_TENSORS,
)
from tests.support import Daemon, write_lora

ANSWER_WITHIN = 10.0  # seconds: a refusal is a header read, never a long wait
KOHYA = "lora_unet_down_blocks_0_attentions_0_proj_in"


# --------------------------------------------------------------------------------- builders


def raw_file(header: dict[str, Any] | bytes, data: bytes = b"",
             header_len: int | None = None) -> bytes:
    """8-byte little-endian header length, the header bytes, the data bytes."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(text) if header_len is None else header_len
    return struct.pack("<Q", length) + text + data


def entry(dtype: Any = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    return {"dtype": dtype,
            "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


def one(data: bytes = b"\x00" * 8, **fields: Any) -> bytes:
    """A file with one tensor ``w`` (F32, shape [2] at [0, 8] unless ``fields`` say otherwise)."""
    return raw_file({"w": entry(**fields)}, data)


def too_many_tensors() -> bytes:
    """MAX_TENSORS + 1 empty tensors, all at offset 0 (one of them alone would be legal)."""
    body = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
                    for i in range(MAX_TENSORS + 1))
    return raw_file(("{" + body + "}").encode())


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    content: Callable[[], bytes]
    expect: tuple[str, ...]  # substrings of the error message, besides the file name


CORPUS = [
    Case("empty", lambda: b"", ("file of 0 bytes is too short",)),
    Case("four-bytes", lambda: b"\x01\x02\x03\x04", ("file of 4 bytes is too short",)),
    Case("seven-bytes", lambda: b"\x00" * 7, ("file of 7 bytes is too short",)),
    Case("header-length-past-eof", lambda: raw_file(b"{}", header_len=1000),
         ("header length 1000 runs past the end of the file",)),
    Case("header-length-2**64-1", lambda: raw_file(b"{}", header_len=2**64 - 1),
         (f"header length {2**64 - 1} exceeds the limit of {MAX_HEADER_BYTES}",)),
    Case("header-length-over-16MiB", lambda: raw_file(b"{}", header_len=MAX_HEADER_BYTES + 1),
         (f"header length {MAX_HEADER_BYTES + 1} exceeds the limit",)),
    Case("truncated-data", lambda: one(b"\x00" * 5),
         ("'w' ends at byte", "past the end of the file", "truncated")),
    Case("header-not-utf8", lambda: raw_file(b'{"w\xff\xfe": 1}'),
         ("header is not valid UTF-8 JSON",)),
    Case("header-not-json", lambda: raw_file(b'{"w": {"dtype": '),
         ("header is not valid UTF-8 JSON",)),
    Case("header-deeply-nested", lambda: raw_file(b"[" * 200_000 + b"]" * 200_000),
         ("header is not valid UTF-8 JSON",)),
    Case("header-json-array", lambda: raw_file(b'[{"dtype": "F32"}]'),
         ("header must be a JSON object",)),
    Case("header-json-string", lambda: raw_file(b'"w"'), ("header must be a JSON object",)),
    Case("duplicate-tensor-names", lambda: raw_file(
        b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
        b' "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\x00" * 8),
        ("duplicate key",)),
    Case("overlapping-offsets", lambda: raw_file(
        {"a": entry("F32", (2,), (0, 8)), "b": entry("F32", (2,), (4, 12))}, b"\x00" * 12),
        ("'a' and 'b' overlap",)),
    Case("out-of-order-and-overlapping", lambda: raw_file(
        {"late": entry("F32", (2,), (8, 16)), "early": entry("F32", (3,), (0, 12))},
        b"\x00" * 16), ("'early' and 'late' overlap",)),
    Case("same-span-twice", lambda: raw_file(
        {"a": entry("F16", (2,), (0, 4)), "b": entry("F16", (2,), (0, 4))}, b"\x00" * 4),
        ("overlap",)),
    Case("begin-after-end", lambda: one(offsets=(8, 0)), ("'w' has invalid data_offsets [8, 0]",)),
    Case("negative-offsets", lambda: one(offsets=(-8, 0)), ("invalid data_offsets [-8, 0]",)),
    Case("float-offsets", lambda: one(offsets=(0.0, 8.0)), ("invalid data_offsets [0.0, 8.0]",)),
    Case("string-offsets", lambda: one(offsets=("0", "8")), ("invalid data_offsets ['0', '8']",)),
    Case("three-offsets", lambda: one(offsets=(0, 4, 8)), ("invalid data_offsets",)),
    Case("missing-offsets", lambda: raw_file({"w": {"dtype": "F32", "shape": [2]}}, b"\x00" * 8),
         ("invalid data_offsets None",)),
    Case("size-mismatch", lambda: one(shape=(3,)), ("'w' spans 8 bytes but F32 [3] needs 12",)),
    Case("size-mismatch-empty-tensor-with-bytes", lambda: one(shape=(0,)),
         ("spans 8 bytes but F32 [0] needs 0",)),
    Case("shape-product-overflow", lambda: one(shape=(MAX_DIM_SIZE,) * 4),
         ("spans 8 bytes", "needs")),
    Case("dtype-F4", lambda: one(dtype="F4"), ("unsupported dtype 'F4'", "allowed: F64")),
    Case("dtype-C64", lambda: one(dtype="C64"), ("unsupported dtype 'C64'",)),
    Case("dtype-lowercase", lambda: one(dtype="f32"), ("unsupported dtype 'f32'",)),
    Case("dtype-not-a-string", lambda: one(dtype=4), ("unsupported dtype 4",)),
    Case("dtype-missing", lambda: raw_file({"w": {"shape": [2], "data_offsets": [0, 8]}},
                                           b"\x00" * 8), ("unsupported dtype None",)),
    Case("shape-negative-dim", lambda: one(shape=(-2,)),
         ("'w' has an invalid shape [-2]", f"at most {MAX_DIMS} non-negative dimensions")),
    Case("shape-9-dims", lambda: one(shape=(1,) * 8 + (2,)), ("invalid shape [1, 1, 1",)),
    Case("shape-huge-dim", lambda: one(shape=(2**41,)), (f"invalid shape [{2**41}]",)),
    Case("shape-float-dim", lambda: one(shape=[2.0]), ("invalid shape [2.0]",)),
    Case("shape-bool-dim", lambda: one(shape=[True, True]), ("invalid shape [True, True]",)),
    Case("shape-not-a-list", lambda: one(shape="2"), ("invalid shape '2'",)),
    Case("shape-int", lambda: one(shape=2), ("invalid shape 2",)),
    Case("metadata-non-string-value", lambda: raw_file(
        {"__metadata__": {"ss_network_alpha": 8}, "w": entry()}, b"\x00" * 8),
        ("__metadata__ must map strings to strings",)),
    Case("metadata-not-an-object", lambda: raw_file(
        {"__metadata__": ["a"], "w": entry()}, b"\x00" * 8),
        ("__metadata__ must map strings to strings",)),
    Case("no-tensors", lambda: raw_file({}), ("the file holds no tensors",)),
    Case("only-metadata", lambda: raw_file({"__metadata__": {"format": "pt"}}),
         ("the file holds no tensors",)),
    Case("too-many-tensors", too_many_tensors,
         (f"{MAX_TENSORS + 1} tensors exceed the limit of {MAX_TENSORS}",)),
    Case("entry-not-an-object", lambda: raw_file({"w": [0, 8]}, b"\x00" * 8),
         ("entry of tensor 'w' must be an object",)),
    Case("entry-null", lambda: raw_file({"w": None}), ("entry of tensor 'w' must be an object",)),
    Case("second-tensor-past-eof", lambda: raw_file(
        {"a": entry("F16", (2,), (0, 4)), "b": entry("F16", (2,), (4, 8))}, b"\x00" * 6),
        ("'b' ends at byte", "truncated")),
]
CASES = {case.id: case for case in CORPUS}
assert len(CASES) == len(CORPUS) >= 24


# ---------------------------------------------------------------------------------- daemon


@dataclasses.dataclass
class Served:
    """One daemon for the whole module, with the bookkeeping the final checks compare to."""

    daemon: Daemon
    lora_dir: Path
    client: LoraCacheClient
    invalid_replies: int = 0  # INVALID_LORA replies this module received
    refused: dict[str, str] = dataclasses.field(default_factory=dict)  # case id -> path
    accepted: set[str] = dataclasses.field(default_factory=set)  # resolved paths of entries
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def attempt(self, path: str | Path, layout: str = "raw",
                client: LoraCacheClient | None = None) -> LoraCacheError | None:
        """Acquire ``path``: the error the daemon answered, or None (the lease is released and
        the entry recorded). Every answer must come quickly."""
        started = time.monotonic()
        try:
            lease = (client or self.client).acquire(str(path), layout=layout)
        except LoraCacheError as exc:
            elapsed = time.monotonic() - started
            assert elapsed < ANSWER_WITHIN, f"{path}: answered after {elapsed:.1f} s"
            if exc.code is ErrorCode.INVALID_LORA:
                with self.lock:
                    self.invalid_replies += 1
            return exc
        with self.lock:
            self.accepted.add(lease.entry.path)
        lease.release()
        return None

    def refuse(self, case: Case, layout: str = "raw") -> LoraCacheError:
        """Write the case's file and check the daemon refuses it as the case says."""
        name = f"{case.id}.safetensors" if layout == "raw" else f"{case.id}-{layout}.safetensors"
        path = self.lora_dir / name
        path.write_bytes(case.content())
        error = self.attempt(name, layout)
        assert error is not None, f"{case.id}: the daemon accepted a malformed file"
        assert error.code is ErrorCode.INVALID_LORA, (case.id, error)
        assert name in error.message, f"the message does not name the file: {error.message}"
        for expected in case.expect:
            assert expected in error.message, (case.id, expected, error.message)
        self.refused[f"{case.id}/{layout}"] = str(path)
        return error


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    lora_dir = tmp_path_factory.mktemp("malformed") / "loras"
    lora_dir.mkdir()
    daemon = Daemon(lora_dir, "--max-bytes", "1GiB")
    try:
        client = daemon.client()
        try:
            yield Served(daemon, lora_dir, client)
        finally:
            client.close()
    finally:
        daemon.cleanup()


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("case", CORPUS, ids=[case.id for case in CORPUS])
def test_malformed_file_is_invalid_lora(served: Served, case: Case) -> None:
    served.refuse(case)


@pytest.mark.parametrize("case_id", ["truncated-data", "overlapping-offsets", "size-mismatch",
                                     "dtype-C64", "header-not-json"])
def test_malformed_file_is_invalid_lora_for_a_family_layout(served: Served, case_id: str) -> None:
    """Converting layouts read the header through the same checks before any conversion."""
    served.refuse(CASES[case_id], layout="sd")


def test_a_file_the_header_accepts_never_fails_as_internal_in_a_family_layout(
        served: Served) -> None:
    """Two tensors with a gap between them: the header rules accept it (raw loads it), but the
    safetensors library the family conversion uses refuses gaps. Whatever the daemon decides,
    the answer is a load or INVALID_LORA naming the file, never an INTERNAL error."""
    down, up = torch.randn(2, 4), torch.randn(4, 2)
    data = tensor_bytes(down) + b"\x00" * 8 + tensor_bytes(up)
    name = "gap.safetensors"
    (served.lora_dir / name).write_bytes(raw_file({
        f"{KOHYA}.lora_down.weight": entry("F32", (2, 4), (0, 32)),
        f"{KOHYA}.lora_up.weight": entry("F32", (4, 2), (40, 72))}, data))
    assert served.attempt(name, "raw") is None  # the raw layout copies the spans it names
    error = served.attempt(name, "sd")
    if error is not None:
        assert error.code is ErrorCode.INVALID_LORA, error
        assert name in error.message, error.message
        # Not recorded as refused: the same file has a legitimate raw entry.


NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
FLOATS = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16}


@pytest.mark.parametrize("value", NON_FINITE, ids=list(NON_FINITE))
@pytest.mark.parametrize("dtype", FLOATS, ids=list(FLOATS))
def test_non_finite_values_are_invalid_for_fusing(served: Served, dtype: str, value: str) -> None:
    """A NaN or Inf anywhere in a floating tensor (here deep inside the second tensor) makes the
    file INVALID_LORA for the family layouts fusing uses, naming the tensor. The raw layout
    serves the file's bytes as they are, as safetensors.load_file would (checking every byte
    of every miss would double its cost)."""
    torch_dtype = FLOATS[dtype]
    up = torch.randn(64, 8).to(torch_dtype)
    up[37, 5] = NON_FINITE[value]
    name = f"non-finite-{dtype}-{value}.safetensors"
    down = torch.randn(8, 64).to(torch_dtype)
    write_lora(served.lora_dir / name, {f"{KOHYA}.lora_down.weight": down,
                                        f"{KOHYA}.lora_up.weight": up})
    error = served.attempt(name, "sd")
    assert error is not None, f"{name}: the daemon accepted a {dtype} tensor holding {value}"
    assert error.code is ErrorCode.INVALID_LORA, error
    assert name in error.message and "NaN or Inf" in error.message, error.message
    assert f"{KOHYA}.lora_up.weight" in error.message, error.message
    assert f"{KOHYA}.lora_down.weight" not in error.message, error.message
    assert served.attempt(name) is None  # raw: the bytes as they are


def test_finite_extremes_and_integer_bit_patterns_are_accepted(served: Served) -> None:
    """Only floating tensors are checked, and only for NaN/Inf: the largest finite values,
    subnormals, -0.0, and an integer tensor whose bytes would read as NaN in float32 load."""
    tensors = {
        "f16": torch.tensor([65504.0, -65504.0, 6e-8, -0.0], dtype=torch.float16),
        "bf16": torch.tensor([3.38e38, -3.38e38, 1e-40, -0.0], dtype=torch.bfloat16),
        "f32": torch.tensor([3.4028235e38, -3.4028235e38, 1e-45, -0.0], dtype=torch.float32),
        "i32": torch.tensor([0x7FC00000, 0x7F800000, -1, 0], dtype=torch.int32),
        "u8": torch.full((8,), 0xFF, dtype=torch.uint8),
    }
    write_lora(served.lora_dir / "extremes.safetensors", tensors)
    with served.client.acquire("extremes.safetensors") as lease:
        for key, tensor in tensors.items():
            assert torch.equal(lease.tensors[key], tensor), key
        served.accepted.add(lease.entry.path)


def test_concurrent_malformed_acquires_all_refused(served: Served) -> None:
    """The whole corpus at once from 8 threads (the header pool has 4): every one refused."""
    for case in CORPUS:
        (served.lora_dir / f"concurrent-{case.id}.safetensors").write_bytes(case.content())

    def attempt(case: Case) -> LoraCacheError | None:
        return served.attempt(f"concurrent-{case.id}.safetensors")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        errors = list(pool.map(attempt, CORPUS))
    for case, error in zip(CORPUS, errors):
        assert error is not None and error.code is ErrorCode.INVALID_LORA, (case.id, error)
        served.refused[f"concurrent-{case.id}"] = str(served.lora_dir /
                                                      f"concurrent-{case.id}.safetensors")


def test_daemon_is_clean_after_the_corpus(served: Served) -> None:
    """Runs last: whatever of the corpus has not run yet runs now, then nothing of it is left."""
    for case in CORPUS:
        if f"{case.id}/raw" not in served.refused:
            served.refuse(case)
    good = torch.arange(12.0).reshape(3, 4)
    write_lora(served.lora_dir / "good.safetensors", {"w": good})
    with served.client.acquire("good.safetensors") as lease:
        assert torch.equal(lease.tensors["w"], good)
        served.accepted.add(lease.entry.path)
        assert served.daemon.stats().leases == 1

    stats = served.daemon.stats()
    assert stats.leases == 0
    assert stats.errors.get("INVALID_LORA", 0) == served.invalid_replies
    assert served.invalid_replies >= len(CORPUS)
    listed = served.client.list(tiers=True)
    entries = [e for e in listed if e.tier == "device"]
    paths = {e.path for e in entries}
    refused = {os.path.realpath(p) for p in served.refused.values()}
    assert not paths & refused, f"entries left by refused files: {paths & refused}"
    assert paths <= served.accepted, paths - served.accepted
    assert all(e.leases == 0 for e in entries)
    cpu = served.daemon.cpu_stats()
    assert cpu.entries == len(entries) >= 1
    assert cpu.reserved == 0 and cpu.leases == 0
    assert cpu.used == sum(e.nbytes for e in entries)
    assert len(served.daemon.shm_files()) == len([e for e in listed if e.tier == "host"]) + len(
        entries)  # host copies of evicted entries live in shared memory too


def test_file_truncated_between_header_check_and_copy(start_daemon, lora_dir: Path) -> None:
    """A file that shrinks after its header was validated, while its load waits for room in a
    full cache: the copy finds the end of the file, the acquire fails with INVALID_LORA naming
    the file, and nothing of it stays (no entry, no reservation, no shm file)."""
    daemon = start_daemon("--max-bytes", "96KiB", "--acquire-timeout", "30")
    write_lora(lora_dir / "holder.safetensors", {"w": torch.randn(64, 256)})  # 64 KiB
    victim = write_lora(lora_dir / "victim.safetensors", {"w": torch.randn(64, 256)})
    size = victim.stat().st_size
    with daemon.client() as client:
        holder = client.acquire("holder.safetensors")  # leased: the victim cannot fit yet
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.acquire, "victim.safetensors")
            wait_until_open(daemon, victim)  # its header is being read (or has been)
            time.sleep(0.5)  # the header pool is done with it; the load waits for room
            assert not pending.done()
            os.truncate(victim, size // 2)
            holder.release()
            with pytest.raises(LoraCacheError) as error:
                pending.result(timeout=30).release()
        assert error.value.code is ErrorCode.INVALID_LORA, error.value
        assert "truncated" in error.value.message, error.value.message
        assert "victim.safetensors" in error.value.message, error.value.message
        stats = daemon.cpu_stats()
        assert stats.reserved == 0 and stats.leases == 0
        listed = client.list(tiers=True)
        assert all(e.path != str(victim.resolve()) for e in listed)
        assert len(daemon.shm_files()) == stats.entries + sum(e.tier == "host" for e in listed)
        assert stats.used == sum(e.nbytes for e in listed if e.tier == "device")
        # The shrunk file is a new identity, refused by its header now.
        with pytest.raises(LoraCacheError) as again:
            client.acquire("victim.safetensors")
        assert again.value.code is ErrorCode.INVALID_LORA
        assert "past the end of the file" in again.value.message
        fresh = torch.randn(64, 256)
        write_lora(victim, {"w": fresh})
        with client.acquire("victim.safetensors") as lease:
            assert torch.equal(lease.tensors["w"], fresh)
    assert daemon.stats().leases == 0


def wait_until_open(daemon: Daemon, path: Path, timeout: float = 10.0) -> None:
    """Until the daemon process holds ``path`` open."""
    fd_dir = Path(f"/proc/{daemon.proc.pid}/fd")
    target = str(path.resolve())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for fd in fd_dir.iterdir():
            try:
                if os.readlink(fd) == target:
                    return
            except OSError:
                continue
        time.sleep(0.01)
    raise AssertionError(f"the daemon never opened {path}")
