"""Bad input gets its error code, and the daemon keeps serving correct answers afterwards."""

from __future__ import annotations

import os

import msgpack
import pytest
import torch
import zmq

from loracache.client import ErrorCode, LoraCacheError
from loracache.shared.protocol import MAX_REQUEST_BYTES, HelloResult, decode_reply, decode_result
from tests.support import write_lora


@pytest.fixture
def raw(daemon):
    """A bare DEALER socket on the daemon's endpoint, for messages the client never sends."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{daemon.socket}")

    def ask(payload: bytes):
        sock.send(payload)
        assert sock.poll(10_000), "the daemon did not answer"
        return decode_reply(sock.recv())

    yield ask
    sock.close()
    context.term()


def session_of(ask) -> str:
    _, hello = ask(msgpack.packb({"v": 1, "id": 1, "op": "hello"}))
    return decode_result(hello, HelloResult).session


def code_of(ask, message) -> ErrorCode:
    payload = message if isinstance(message, bytes) else msgpack.packb(message)
    request_id, result = ask(payload)
    assert isinstance(result, LoraCacheError), result
    assert result.message
    return result.code


def assert_still_serving(daemon, lora_dir):
    write_lora(lora_dir / "ok.safetensors", {"w": torch.arange(10.0)})
    with daemon.client() as client, client.acquire("ok.safetensors") as lease:
        assert torch.equal(lease.tensors["w"], torch.arange(10.0))


@pytest.mark.parametrize("message", [
    b"\xc1",  # never-used msgpack byte
    b"not msgpack at all",
    msgpack.packb([1, 2, 3]),
    msgpack.packb({"v": 1, "op": "stats"}),  # no id
    msgpack.packb({"v": 1, "id": 1, "op": "teleport"}),
    msgpack.packb({"v": 1, "id": 1}),
    msgpack.packb({"v": 1, "id": 1, "op": "acquire"}),  # no path
    msgpack.packb({"v": 1, "id": 1, "op": "acquire", "path": 42}),
    msgpack.packb({"v": 1, "id": 1, "op": "preload", "path": "a", "pin": "yes"}),
    msgpack.packb({"v": 1, "id": 1, "op": "stats", "session": 5}),
    msgpack.packb({"v": 1, "id": 1, "op": "stats", "session": [[[[[[[[[[1]]]]]]]]]]}),
    # an unknown field is ignored, but not one nested 200,000 levels deep
    b"\x84" + b"".join(map(msgpack.packb, ["v", 1, "id", 1, "op", "stats", "x"]))
    + b"\x91" * 200_000 + b"\xc0",
    msgpack.packb({"v": 1, "id": 1, "op": "stats", "pad": "x" * 100}) + b"trailing",
    b"\x81" + msgpack.packb("v") + b"\xd4\x01\x00",  # an ext type
    msgpack.packb({"v": 1, "id": 1, "op": "stats", "pad": b"x" * MAX_REQUEST_BYTES}),
], ids=["reserved-byte", "text", "array", "no-id", "unknown-op", "no-op", "missing-field",
        "mistyped-path", "mistyped-pin", "mistyped-session", "nested-session", "too-deep",
        "trailing-bytes", "ext-type", "oversized"])
def test_malformed_messages_get_bad_request(raw, daemon, lora_dir, message):
    assert code_of(raw, message) is ErrorCode.BAD_REQUEST
    assert_still_serving(daemon, lora_dir)


def test_wrong_version_gets_version_mismatch(raw, daemon, lora_dir):
    assert code_of(raw, {"v": 2, "id": 3, "op": "hello"}) is ErrorCode.VERSION_MISMATCH
    assert_still_serving(daemon, lora_dir)


def test_errors_carry_the_request_id(raw):
    request_id, result = raw(msgpack.packb({"v": 1, "id": 77, "op": "teleport"}))
    assert request_id == 77 and result.code is ErrorCode.BAD_REQUEST


def test_session_ops_need_a_session(raw):
    assert code_of(raw, {"v": 1, "id": 1, "op": "acquire", "path": "a.safetensors",
                         "session": "forged"}) is ErrorCode.UNKNOWN_SESSION


def test_unknown_lease_and_device(raw):
    session = session_of(raw)
    assert code_of(raw, {"v": 1, "id": 2, "op": "release", "lease": "nope",
                         "session": session}) is ErrorCode.UNKNOWN_LEASE
    assert code_of(raw, {"v": 1, "id": 3, "op": "acquire", "path": "a.safetensors",
                         "device": "tpu:0", "session": session}) is ErrorCode.UNKNOWN_DEVICE


def test_unknown_layout_is_refused(daemon, lora_dir):
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(4)})
    with daemon.client() as client, pytest.raises(LoraCacheError) as error:
        client.acquire("a.safetensors", layout="picasso")
    assert error.value.code is ErrorCode.BAD_REQUEST and "raw" in error.value.message


def make_bad_files(lora_dir, tmp_path):
    """Each path (relative to the LoRA dir or absolute) and the code it must get."""
    outside = write_lora(tmp_path / "outside" / "x.safetensors", {"w": torch.ones(4)})
    (lora_dir / "escape.safetensors").symlink_to(outside)
    (lora_dir / "dir.safetensors").mkdir()
    (lora_dir / "notes.txt").write_text("hello")
    os.mkfifo(lora_dir / "fifo.safetensors")
    good = write_lora(lora_dir / "good.safetensors", {"w": torch.ones(1000)}).read_bytes()
    (lora_dir / "truncated.safetensors").write_bytes(good[:len(good) // 2])
    (lora_dir / "garbage.safetensors").write_bytes(os.urandom(4096))
    (lora_dir / "short.safetensors").write_bytes(b"\x01\x02")
    (lora_dir / "header-past-end.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}")
    (lora_dir / "empty.safetensors").write_bytes(b"")
    return {
        str(outside): ErrorCode.FORBIDDEN_PATH,
        "../outside/x.safetensors": ErrorCode.FORBIDDEN_PATH,
        "escape.safetensors": ErrorCode.FORBIDDEN_PATH,
        "/etc/passwd": ErrorCode.FORBIDDEN_PATH,
        "dir.safetensors": ErrorCode.FORBIDDEN_PATH,
        "notes.txt": ErrorCode.FORBIDDEN_PATH,
        "fifo.safetensors": ErrorCode.FORBIDDEN_PATH,
        "missing.safetensors": ErrorCode.NOT_FOUND,
        "truncated.safetensors": ErrorCode.INVALID_LORA,
        "garbage.safetensors": ErrorCode.INVALID_LORA,
        "short.safetensors": ErrorCode.INVALID_LORA,
        "header-past-end.safetensors": ErrorCode.INVALID_LORA,
        "empty.safetensors": ErrorCode.INVALID_LORA,
        "": ErrorCode.BAD_REQUEST,
    }


def test_bad_paths_and_files_get_their_codes(daemon, lora_dir, tmp_path):
    with daemon.client() as client:
        for path, code in make_bad_files(lora_dir, tmp_path).items():
            with pytest.raises(LoraCacheError) as error:
                client.acquire(path)
            assert error.value.code is code, (path, error.value)
        stats = daemon.cpu_stats()
        assert stats.entries == 0 and stats.used == 0 and stats.reserved == 0
        assert daemon.stats().leases == 0 and daemon.shm_files() == []
    assert_still_serving(daemon, lora_dir)


@pytest.mark.parametrize("down_shape, up_shape, problem", [
    ((4, 32), (32, 8), "rank 4 and up 8"),
    ((5000, 8), (8, 5000), "between 1 and 4096"),
    ((4, 32, 1), (32, 4, 1), "3 and 3 dimensions"),
], ids=["ranks-differ", "rank-too-large", "three-dims"])
def test_lora_factors_with_bad_ranks_or_dims_are_invalid(daemon, lora_dir, down_shape, up_shape,
                                                         problem):
    """The family layouts pair each layer's factors: their rank must agree and be bounded."""
    module = "unet.down_blocks.0.attentions.0.proj_in"
    write_lora(lora_dir / "bad.safetensors", {f"{module}.lora_A.weight": torch.ones(down_shape),
                                              f"{module}.lora_B.weight": torch.ones(up_shape)})
    with daemon.client() as client, pytest.raises(LoraCacheError) as error:
        client.acquire("bad.safetensors", layout="sd")
    assert error.value.code is ErrorCode.INVALID_LORA
    assert problem in error.value.message and "proj_in" in error.value.message
