"""A bounded live fuzz: thousands of random, mutated and valid messages against a real daemon.

Several raw DEALER sockets send, in batches without waiting for each reply: random bytes,
random msgpack trees, valid requests with one field mutated (wrong type, huge value, unknown
op / session / lease, paths with ``..``, NUL, very long, not a string), valid requests damaged
by bit flips and byte insertions or deletions, truncated msgpack, multi-frame messages, empty
frames and messages of a few MiB; valid hellos, acquires and releases of real files are
interleaved, so sessions and leases do exist while the rest arrives (and the mutations reuse
their tokens). Replies are drained with a poller between batches. Every reply must decode with
``decode_reply`` into a result or an error with a known code, never INTERNAL.

Afterwards the daemon must be alive, serve a normal acquire with the right values, and, once the
fuzzed sessions are past their TTL, hold no session and no lease; its log must show no internal
error.

``LORACACHE_FUZZ_MESSAGES`` sets the number of messages (default 10,000: about 20 s on two
cores); ``LORACACHE_FUZZ_SEED`` replays a run (the seed is printed).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import msgspec
import torch
import zmq

from loracache.client import LoraCacheClient
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.families import FAMILIES
from loracache.shared.protocol import (
    MAX_REQUEST_BYTES,
    MAX_TEXT_LEN,
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    AcquireResult,
    HelloResult,
    decode_reply,
    decode_result,
)
from tests.support import Daemon, write_lora

MESSAGES = int(os.environ.get("LORACACHE_FUZZ_MESSAGES", "10000"))
SEED = int(os.environ.get("LORACACHE_FUZZ_SEED", "1337"))
SESSION_TTL = 1.0
SOCKETS = 6
BATCH = 240  # messages between two drains: far below the sockets' high-water marks (1000)
# A drain gives up after this long without a reply. Most replies take milliseconds; the first
# acquire in a family layout imports diffusers in the daemon, seconds on a busy machine.
QUIET_MS = 10_000
SEND_TIMEOUT_MS = 10_000
EXPIRY_TIMEOUT = SESSION_TTL + 5.0
# Error codes only the client makes; the daemon never sends them.
CLIENT_ONLY = {ErrorCode.DAEMON_UNAVAILABLE, ErrorCode.TIMEOUT}
OPS = sorted(REQUEST_TYPES)
VALID_IDS = 1 << 60


def lora_files() -> dict[str, dict[str, torch.Tensor]]:
    return {
        "a.safetensors": {"w": torch.arange(64, dtype=torch.float32).reshape(8, 8)},
        "b.safetensors": {
            "x.lora_down.weight": torch.linspace(-1, 1, 64).reshape(4, 16).half(),
            "x.lora_up.weight": torch.linspace(2, -2, 64).reshape(16, 4).half(),
        },
        "sub/c.safetensors": {"alpha": torch.tensor(8.0), "ids": torch.arange(30),
                              "flag": torch.tensor([True, False, True])},
    }


# ---------------------------------------------------------------------------- the fuzzer


@dataclasses.dataclass
class Pending:
    """A valid-flow request whose reply the fuzzer reads, to learn sessions, leases, entries."""

    kind: str
    session: str = ""
    path: str = ""


@dataclasses.dataclass
class Lease:
    session: str
    lease: str
    entry: str


class Fuzzer:
    def __init__(self, rng: random.Random, lora_dir: Path, files: dict[str, dict]) -> None:
        self.rng = rng
        self.lora_dir = lora_dir
        self.files = files
        self.ids = itertools.count(1)
        self.sessions: list[str] = []  # live as far as we know: the last few hellos
        self.leases: list[Lease] = []
        self.entries: list[str] = []
        self.pending: dict[tuple[int, int], Pending] = {}
        self.leases_made = 0
        self.kinds: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ values and fields

    def session(self) -> str:
        return self.rng.choice(self.sessions) if self.sessions and self.rng.random() < 0.9 else ""

    def path(self) -> str:
        name = self.rng.choice(list(self.files))
        return str(self.lora_dir / name) if self.rng.random() < 0.2 else name

    def scalar(self) -> Any:
        rng = self.rng
        return rng.choice([
            lambda: None, lambda: True, lambda: False,
            lambda: rng.choice([0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63,
                                2**64 - 1, -(2**63)]),
            lambda: rng.randint(-(2**63), 2**64 - 1),
            lambda: rng.choice([0.0, -0.0, 1.5, 1e308, -1e308, float("inf"), float("nan")]),
            lambda: "".join(rng.choice("ab/.\x00é💥 \n") for _ in range(rng.randint(0, 12))),
            lambda: rng.choice(OPS + ["v", "id", "op", "session", "path", "lease", "cpu", "raw"]),
            lambda: rng.randbytes(rng.randint(0, 12)),
        ])()

    def key(self) -> Any:
        if self.rng.random() < 0.9:
            return self.rng.choice(["v", "id", "op", "session", "path", "lease", "device",
                                    "layout", "pin", "pid", "client", "known_entry", "x", ""])
        return self.rng.choice([1, -1, None, True, 2.5, b"path"])  # refused as map keys

    def tree(self, depth: int = 0) -> Any:
        r = self.rng.random()
        if depth < 12 and r < 0.2:
            return [self.tree(depth + 1) for _ in range(self.rng.randint(0, 4))]
        if depth < 12 and r < 0.4:
            return {self.key(): self.tree(depth + 1) for _ in range(self.rng.randint(0, 4))}
        return self.scalar()

    def bad_path(self) -> Any:
        rng = self.rng
        name = rng.choice(list(self.files))
        return rng.choice([
            "../" + name, f"sub/../../{name}", "a/../../../etc/passwd", "/etc/passwd", "/", "",
            ".", "..", "sub", "sub/", f"{name}/", f"./{name}", f"{name}\x00", "\x00",
            f"sub/\x00/{name}", "x" * 4097 + ".safetensors", "y" * MAX_TEXT_LEN,
            "z" * (MAX_TEXT_LEN + 1), "/" * 5000 + name, "💥.safetensors",
            "missing.safetensors", str(self.lora_dir), str(self.lora_dir) + "/../x.safetensors",
            "a.safetensors" * 300, " a.safetensors", "a.safetensors\n", "a.SAFETENSORS",
            42, -1, 2**64 - 1, None, True, 1.5, [name], {"path": name}, name.encode(),
        ])

    def mutation(self, key: str) -> Any:
        """A wrong value for ``key``: wrong type, huge, unknown, or a path attack."""
        rng = self.rng
        choices: list[Callable[[], Any]] = [self.scalar, self.tree]
        if key in ("path",):
            choices += [self.bad_path] * 6
        if key in ("session", "lease", "known_entry"):
            choices += [lambda: rng.randbytes(16).hex(), lambda: "x" * rng.randint(0, 9000),
                        lambda: self.leases[-1].lease if self.leases else "L",
                        lambda: self.sessions[0] if self.sessions else "S"] * 2
        if key in ("device", "layout"):
            choices += [lambda: rng.choice(["", "gpu", "cuda", "cuda:0", "cuda:99", "CPU",
                                            "cpu ", "cpu\x00", "raw", "cpu", "tpu:0",
                                            "d" * 9000, "GPU-" + "f" * 32, "diffusers",
                                            "picasso", *FAMILIES])] * 3
        if key == "op":
            choices += [lambda: rng.choice(["teleport", "", "HELLO", "acquire ", "stats\x00"]),
                        lambda: rng.choice(OPS)] * 3
        if key in ("pid", "id", "v"):
            choices += [lambda: rng.choice([-1, 0, 2, 2**31, 2**63 - 1, 2**64 - 1, -(2**63),
                                            True, 1.0, "1", None])] * 3
        return rng.choice(choices)()

    # ---------------------------------------------------------------------------- requests

    def body(self, op: str | None = None) -> dict[str, Any]:
        """A valid request of ``op`` (random if None), with real sessions, paths and leases."""
        rng = self.rng
        op = op or rng.choice(OPS)
        lease = rng.choice(self.leases) if self.leases else None
        session = lease.session if op == "release" and lease else self.session()
        body: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": next(self.ids), "op": op,
                                "session": session}
        if op == "hello":
            body.update(pid=os.getpid(), client="fuzz")
        elif op in ("acquire", "preload"):
            body.update(path=self.path(), device="cpu", layout="raw")
            if op == "acquire" and self.entries and rng.random() < 0.3:
                body["known_entry"] = rng.choice(self.entries)
            if op == "preload":
                body["pin"] = rng.random() < 0.3
        elif op == "release":
            body["lease"] = lease.lease if lease else "no-lease"
        elif op == "evict":
            body["path"] = self.path()
            if rng.random() < 0.5:
                body["device"] = "cpu"
        elif op == "clear" and rng.random() < 0.5:
            body["device"] = "cpu"
        return body

    def valid(self, sock: int) -> list[bytes]:
        """The valid flow: hellos (some with odd but valid pids), acquires, releases, ..."""
        rng = self.rng
        op = rng.choices(["hello", "acquire", "release", "heartbeat", "bye", "stats", "list",
                          "preload", "evict", "clear"],
                         weights=[8, 30, 22, 10, 2, 3, 3, 4, 3, 1])[0]
        body = self.body(op)
        if op == "hello" and rng.random() < 0.4:
            # Valid pids, as far as the protocol says: dead, zero, negative, beyond pid_t.
            body["pid"] = rng.choice([0, -1, 1, 4_000_000, 2**31, 2**63 - 1, 2**64 - 1])
        if op == "release" and self.leases:
            lease = self.leases.pop(rng.randrange(len(self.leases)))
            body.update(session=lease.session, lease=lease.lease)
        if op in ("heartbeat", "bye") and not body["session"]:
            body["session"] = self.session()
        if op == "bye" and body["session"] in self.sessions:
            self.sessions.remove(body["session"])
            self.leases = [x for x in self.leases if x.session != body["session"]]
        # Ids of their own, which no bit flip of a fuzzed message's small id reaches: a reply
        # with one of them answers this very request.
        body["id"] |= VALID_IDS
        self.pending[(sock, body["id"])] = Pending(op, body["session"], body.get("path", ""))
        return [msgpack.packb(body)]

    def learn(self, sock: int, request_id: int, value: Any) -> None:
        pending = self.pending.pop((sock, request_id), None)
        if pending is None or isinstance(value, LoraCacheError):
            return
        if pending.kind == "hello":
            hello = decode_result(value, HelloResult)
            self.sessions = (self.sessions + [hello.session])[-12:]
        elif pending.kind == "acquire":
            result = decode_result(value, AcquireResult)  # a well-formed acquire result
            name = os.path.relpath(result.entry.path, os.path.realpath(self.lora_dir))
            if result.tensors is not None:
                assert {t.name for t in result.tensors} == set(self.files[name]), name
            self.leases_made += 1
            self.leases = (self.leases + [Lease(pending.session, result.lease,
                                                result.entry.id)])[-40:]
            self.entries = sorted(set(self.entries[-10:]) | {result.entry.id})

    def mutated_field(self) -> list[bytes]:
        if self.rng.random() < 0.3:  # a path attack where the path is read
            body = self.body(self.rng.choice(["acquire", "preload", "evict"]))
            key = "path"
        else:
            body = self.body()
            key = self.rng.choice(sorted(set(body) | {"path", "lease", "device", "layout", "pin",
                                                      "pid", "known_entry", "client"}))
        if self.rng.random() < 0.1:
            body.pop(key, None)
        else:
            body[key] = self.mutation(key)
        if self.rng.random() < 0.1:
            body[self.key()] = self.tree()  # an unknown field, or a refused key
        return [msgpack.packb(body)]

    def damaged(self) -> list[bytes]:
        raw = bytearray(msgpack.packb(self.body()))
        rng = self.rng
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(raw) + 1)
            kind = rng.choice(["flip", "flip", "insert", "delete", "replace"])
            if kind == "flip" and raw:
                raw[min(at, len(raw) - 1)] ^= 1 << rng.randrange(8)
            elif kind == "insert":
                raw[at:at] = rng.randbytes(rng.randint(1, 4))
            elif kind == "delete":
                del raw[at:at + rng.randint(1, 6)]
            elif kind == "replace" and raw:
                raw[min(at, len(raw) - 1)] = rng.randrange(256)
        return [bytes(raw)]

    def truncated(self) -> list[bytes]:
        raw = msgpack.packb(self.body())
        return [raw[:self.rng.randrange(len(raw))]]

    def random_tree(self) -> list[bytes]:
        value = self.tree()
        if self.rng.random() < 0.3:
            value = {**self.body(), self.key(): value}
        if self.rng.random() < 0.1:
            for _ in range(self.rng.randint(5, 20)):
                value = [value] if self.rng.random() < 0.5 else {"k": value}
        return [msgpack.packb(value, use_bin_type=self.rng.random() < 0.8)]

    def random_bytes(self) -> list[bytes]:
        rng = self.rng
        return [rng.choice([
            lambda: rng.randbytes(rng.randint(0, 512)),
            lambda: b"\x91" * rng.randint(500, 3000) + b"\xc0",  # past msgpack's own stack
            lambda: bytes([rng.choice([0xdc, 0xdd, 0xde, 0xdf, 0xc6, 0xdb])]) + rng.randbytes(4),
            lambda: rng.choice([b"", b"\xc1", b"\x80", b"\x90", b"\xc0"]),
        ])()]

    def oversized(self) -> list[bytes]:
        """1 MiB (the limit: accepted) to 3 MiB."""
        rng = self.rng
        size = rng.choice([MAX_REQUEST_BYTES, MAX_REQUEST_BYTES + 1,
                           rng.randint(MAX_REQUEST_BYTES, 3 << 20)])
        if rng.random() < 0.3:
            return [rng.randbytes(size)]
        body = self.body("stats")
        body["pad"] = b""
        overhead = len(msgpack.packb({**body, "pad": b"x" * 70_000})) - 70_000
        body["pad"] = b"x" * max(70_000, size - overhead)
        return [msgpack.packb(body)]

    GENERATORS = {  # name: weight
        "valid": 22, "mutated_field": 28, "damaged": 18, "truncated": 5, "random_tree": 12,
        "random_bytes": 12, "oversized": 0.4,
    }

    def message(self, sock: int) -> list[bytes]:
        name = self.rng.choices(list(self.GENERATORS), weights=list(self.GENERATORS.values()))[0]
        self.kinds[name] += 1
        frames = self.valid(sock) if name == "valid" else getattr(self, name)()
        if name != "valid" and self.rng.random() < 0.12:  # routed frames before the payload
            extra = [self.rng.choice([b"", b"\x00", self.rng.randbytes(self.rng.randint(1, 40)),
                                      msgpack.packb(self.body())])
                     for _ in range(self.rng.randint(1, 3))]
            frames = extra + frames
            self.kinds["multi_frame"] += 1
        elif name != "valid" and self.rng.random() < 0.01:
            frames = [b""]
            self.kinds["empty_frame"] += 1
        return frames


# ------------------------------------------------------------------------------- the test


def reply_problem(frames: list[bytes]) -> str | None:
    """What is wrong with one reply (its last frame is the payload), or None."""
    payload = frames[-1]
    try:
        _, value = decode_reply(payload)
    except LoraCacheError as exc:
        return f"undecodable reply {payload[:200]!r}: {exc}"
    if isinstance(value, LoraCacheError):
        code = msgpack.unpackb(payload)["error"].get("code")
        if code not in ErrorCode.__members__:
            return f"unknown error code in {payload[:300]!r}"
        if value.code is ErrorCode.INTERNAL or value.code in CLIENT_ONLY:
            return f"{value.code.value} reply: {value.message[:300]}"
    return None


def raw_request(daemon: Daemon, body: dict[str, Any], timeout_ms: int = 5000) -> Any:
    """One request on a fresh DEALER, without a session (so it opens none)."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{daemon.socket}")
        sock.send(msgpack.packb({"v": PROTOCOL_VERSION, "id": 1, **body}))
        assert sock.poll(timeout_ms), f"no reply to {body}"
        _, value = decode_reply(sock.recv())
    finally:
        sock.close()
        context.term()
    assert not isinstance(value, LoraCacheError), value
    return msgspec.msgpack.decode(value)


def test_live_fuzz_leaves_the_daemon_serving_and_clean(start_daemon, lora_dir):
    started = time.monotonic()
    print(f"\nfuzz seed {SEED} (LORACACHE_FUZZ_SEED={SEED} replays it), {MESSAGES} messages",
          flush=True)
    files = lora_files()
    for name, tensors in files.items():
        write_lora(lora_dir / name, tensors)
    daemon = start_daemon("--session-ttl", str(SESSION_TTL), "--max-bytes", "64MiB")
    fuzzer = Fuzzer(random.Random(SEED), lora_dir, files)

    context = zmq.Context()
    socks = []
    for _ in range(SOCKETS):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        sock.connect(f"ipc://{daemon.socket}")
        socks.append(sock)
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    index = {sock: i for i, sock in enumerate(socks)}

    sent = replies = given_up = 0
    by_code: collections.Counter[str] = collections.Counter()
    problems: list[str] = []

    def drain(quiet_ms: int, target: int) -> None:
        """Read replies until ``target`` are in, or none came for ``quiet_ms``."""
        nonlocal replies
        while replies < target:
            ready = dict(poller.poll(quiet_ms))
            if not ready:
                return
            for sock in ready:
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    replies += 1
                    problem = reply_problem(frames)
                    if problem:
                        problems.append(problem)
                        continue
                    request_id, value = decode_reply(frames[-1])
                    by_code[value.code.value if isinstance(value, LoraCacheError) else "ok"] += 1
                    fuzzer.learn(index[sock], request_id, value)

    try:
        fuzz_started = time.monotonic()
        while sent < MESSAGES:
            for _ in range(min(BATCH, MESSAGES - sent)):
                i = fuzzer.rng.randrange(SOCKETS)
                frames = fuzzer.message(i)
                try:
                    socks[i].send_multipart(frames)
                except zmq.Again:
                    raise AssertionError(f"the daemon stopped reading: a send blocked "
                                         f"{SEND_TIMEOUT_MS} ms after {sent} messages") from None
                sent += 1
            # Not every message must be answered: those given up on are not waited for again
            # (a late reply to one of them leaves one of this batch for the next drain).
            drain(QUIET_MS, sent - given_up)
            given_up = max(given_up, sent - replies)
            assert daemon.proc.poll() is None, f"the daemon died after {sent} messages"
        drain(QUIET_MS, sent)
        fuzz_seconds = time.monotonic() - fuzz_started
    finally:
        for sock in socks:
            sock.close()
        context.term()

    unanswered = sent - replies
    print(f"fuzz: {sent} messages sent, {replies} replies "
          f"({unanswered} unanswered) in {fuzz_seconds:.1f} s; replies by code "
          f"{dict(sorted(by_code.items()))}; messages by kind {dict(sorted(fuzzer.kinds.items()))};"
          f" {fuzzer.leases_made} leases made", flush=True)
    assert not problems, f"{len(problems)} bad replies (seed {SEED}), first ones:\n" + \
        "\n".join(problems[:10])
    assert fuzzer.leases_made > 0 and by_code["ok"] > 0, "the valid flow never got a lease"
    assert by_code[ErrorCode.BAD_REQUEST.value] > 0
    assert daemon.proc.poll() is None, "the daemon died"

    # It still serves: a normal client gets the right values for every file.
    with LoraCacheClient(daemon.socket, heartbeat=False) as client:
        for name, tensors in files.items():
            with client.acquire(name) as lease:
                assert set(lease.tensors) == set(tensors), name
                for key, expected in tensors.items():
                    got = lease.tensors[key]
                    assert got.dtype == expected.dtype and torch.equal(got, expected), (name, key)

    # Once the fuzzed sessions are past their TTL, nothing is held.
    deadline = time.monotonic() + EXPIRY_TIMEOUT
    while True:
        stats = raw_request(daemon, {"op": "stats"})
        if (stats["sessions"] == 0 and stats["leases"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stats["sessions"] == 0 and stats["leases"] == 0, (
        f"sessions or leases left {EXPIRY_TIMEOUT:g} s after the fuzz (session TTL "
        f"{SESSION_TTL:g} s, seed {SEED}): {stats}\nlog:\n{log_excerpt(daemon.read_log())}")
    for device in stats["devices"]:
        assert device["sessions"] == 0 and device["leases"] == 0, device
    with LoraCacheClient(daemon.socket, heartbeat=False) as client:
        entries = client.list()
    assert entries and all(e.leases == 0 for e in entries), entries
    assert daemon.proc.poll() is None

    log = daemon.read_log()
    assert not bad_lines(log), f"the daemon's log has internal errors:\n{log_excerpt(log)}"
    seconds = time.monotonic() - started
    print(f"fuzz summary: seed {SEED}, {sent} sent, {replies} replies, "
          f"{unanswered} unanswered, by code {dict(sorted(by_code.items()))}, "
          f"{seconds:.1f} s in all", flush=True)


def bad_lines(log: str) -> list[str]:
    return [line for line in log.splitlines()
            if "internal error" in line.lower() or "Traceback" in line
            or "exception was never retrieved" in line]


def log_excerpt(log: str, lines: int = 30) -> str:
    """The lines around the daemon's first internal error, else its last lines."""
    rows = log.splitlines()
    bad = bad_lines(log)
    if not bad:
        return "\n".join(rows[-lines:])
    at = rows.index(bad[0])
    return "\n".join(rows[max(0, at - 3):at + lines])


def test_fuzz_finding_a_hello_with_a_pid_beyond_pid_t_is_refused(start_daemon, lora_dir):
    """Found by the fuzz above: ``pid`` is any msgpack integer on the wire, and expiring a
    session checks its pid with kill(2), which overflowed and stopped every later expiry. A
    pid no kernel hands out is refused at hello; ordinary sessions expire as before."""
    write_lora(lora_dir / "a.safetensors", {"w": torch.arange(4.0)})
    daemon = start_daemon("--session-ttl", str(SESSION_TTL), "--max-bytes", "64MiB")
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{daemon.socket}")

    def ask(body: dict[str, Any]) -> Any:
        sock.send(msgpack.packb({"v": PROTOCOL_VERSION, "id": 1, **body}))
        assert sock.poll(5000), f"no reply to {body}"
        return decode_reply(sock.recv())[1]

    try:
        for pid in (2**63 - 1, 2**31, -1):
            refused = ask({"op": "hello", "pid": pid})
            assert isinstance(refused, LoraCacheError), refused
            assert refused.code is ErrorCode.BAD_REQUEST and str(pid) in refused.message
        session = decode_result(ask({"op": "hello", "pid": os.getpid()}), HelloResult).session
        ask({"op": "acquire", "session": session, "path": "a.safetensors"})
        assert raw_request(daemon, {"op": "stats"})["leases"] == 1
    finally:
        sock.close()
        context.term()
    deadline = time.monotonic() + EXPIRY_TIMEOUT
    while (stats := raw_request(daemon, {"op": "stats"}))["sessions"] \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    log = daemon.read_log()
    assert (stats["sessions"], stats["leases"]) == (0, 0), f"{stats}\n{log_excerpt(log)}"
    assert not bad_lines(log), log_excerpt(log)
