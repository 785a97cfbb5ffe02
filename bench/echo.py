"""The baseline for hits: a bare ZeroMQ + msgpack echo (msgspec, as the daemon) over ipc://.

The server (``python -m bench.echo asyncio|sync ENDPOINT``) runs in its own process. It decodes
each request and encodes a reply of the size the daemon would send for it, and does nothing
else: that is the floor any request/reply daemon on this transport can reach. The ``asyncio``
server uses a zmq.asyncio ROUTER as the daemon does; the ``sync`` one a blocking ROUTER, to show
what the event loop itself costs. This module imports neither torch nor loracache, so the
server starts fast and carries nothing it does not need.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

MODES = ("asyncio", "sync")
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ messages the daemon sends


def acquire_request(request_id: int, session: str, path: str) -> dict[str, Any]:
    """Shaped like the client's acquire of a cached entry whose table it already holds."""
    return {"v": 1, "id": request_id, "op": "acquire", "session": session, "path": path,
            "device": "cpu", "layout": "raw", "known_entry": "1"}


def release_request(request_id: int, session: str, lease: str) -> dict[str, Any]:
    return {"v": 1, "id": request_id, "op": "release", "session": session, "lease": lease}


def acquire_reply(request_id: int, path: str) -> dict[str, Any]:
    """Shaped like the daemon's reply to a hit: lease, entry info and handle, no tensor table."""
    lease = "L" * 22  # secrets.token_urlsafe(16) is 22 characters
    entry = {"id": "1", "path": path, "device": "cpu", "layout": "raw", "nbytes": 4_800_000,
             "leases": 1, "pinned": False, "idle_s": 0.0}
    handle = {"kind": "shm", "path": f"/dev/shm/lc-bench-xxxxxxxx/loracache-0/{os.getpid()}-"
                                    "0123abcd/1.bin", "nbytes": 4_800_000}
    return {"id": request_id, "ok": True,
            "result": {"lease": lease, "entry": entry, "handle": handle, "tensors": None}}


def reply_to(request: dict[str, Any]) -> dict[str, Any]:
    if request.get("op") == "acquire":
        return acquire_reply(request["id"], request.get("path", ""))
    return {"id": request.get("id", 0), "ok": True, "result": {}}


# --------------------------------------------------------------------------------- servers


async def serve_asyncio(endpoint: str) -> None:
    context = zmq.asyncio.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    while True:
        *route, payload = await sock.recv_multipart()
        reply = reply_to(msgspec.msgpack.decode(payload))
        await sock.send_multipart([*route, msgspec.msgpack.encode(reply)])


def serve_sync(endpoint: str) -> None:
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    while True:
        *route, payload = sock.recv_multipart()
        reply = reply_to(msgspec.msgpack.decode(payload))
        sock.send_multipart([*route, msgspec.msgpack.encode(reply)])


class EchoServer:
    """An echo server process on a fresh ipc:// socket under /tmp; a context manager."""

    def __init__(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.mode = mode
        self.home = Path(tempfile.mkdtemp(prefix="lc-bench-echo-", dir="/tmp"))
        self.endpoint = f"ipc://{self.home / 'echo.sock'}"
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.echo", mode, self.endpoint],
                                     cwd=REPO)
        try:
            EchoClient(self.endpoint, ready_timeout=30.0).close()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> "EchoServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------- client


class EchoClient:
    """A sync DEALER that does what LoraCacheClient does per request: pack, send, poll,
    receive, unpack. Checks it can reach the server within ``ready_timeout``."""

    def __init__(self, endpoint: str, path: str = "/tmp/lc-bench-loras-xxxxxxxx/hit.safetensors",
                 ready_timeout: float = 5.0) -> None:
        self._context = zmq.Context()
        self._sock = self._context.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self._session = secrets.token_urlsafe(16)
        self._path = path
        self._id = 0
        self._round_trip(release_request(0, self._session, "L" * 22), ready_timeout)

    def acquire_like(self) -> None:
        """One round trip with acquire-sized messages."""
        self._id += 1
        self._round_trip(acquire_request(self._id, self._session, self._path))

    def hit_like(self) -> None:
        """The two round trips of an acquire + release, with their message sizes."""
        self.acquire_like()
        self._id += 1
        self._round_trip(release_request(self._id, self._session, "L" * 22))

    def _round_trip(self, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        self._sock.send(msgspec.msgpack.encode(request))
        if not self._sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"the echo server did not answer within {timeout:g} s")
        reply = msgspec.msgpack.decode(self._sock.recv())
        if reply.get("id") != request["id"]:
            raise RuntimeError(f"echo reply {reply.get('id')} to request {request['id']}")
        return reply

    def close(self) -> None:
        self._sock.close(linger=0)
        self._context.term()


def main() -> None:
    parser = argparse.ArgumentParser(description="a bare ZeroMQ + msgpack echo server")
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("endpoint")
    args = parser.parse_args()
    try:
        if args.mode == "asyncio":
            asyncio.run(serve_asyncio(args.endpoint))
        else:
            serve_sync(args.endpoint)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
