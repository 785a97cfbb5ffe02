"""Workers of other accounts than the daemon's, as the README's deployment has them: the daemon
runs as its own user, workers as other users in its group. The tests run as root and start
workers as user ``nobody``."""

from __future__ import annotations

import os

import pytest
from safetensors.torch import load_file

from loracache.client import ErrorCode, LoraCacheError
from loracache.shared.protocol import DropResult
from tests.support import Worker, digest, sized_lora, wait_until
from examples.tiny_models import save, sd_lora_peft, tiny_sd_pipeline

NOBODY = 65534
MiB = 1 << 20


def test_a_worker_of_another_user_in_the_group_leases_and_releases(daemon, lora_dir):
    path = sized_lora(lora_dir / "a.safetensors", MiB)
    expected = {name: digest(tensor) for name, tensor in load_file(path).items()}
    worker = Worker(daemon.socket, user=NOBODY, group=os.getgid())
    try:
        lease = worker.call("acquire", path=str(path))
        assert lease["digests"] == expected
        assert daemon.stats().leases == 1
        worker.call("release", lease=lease["lease"])
        assert daemon.stats().leases == 0
    finally:
        worker.close()


def test_a_worker_outside_the_group_is_told_which_directory_refuses_it(locked_socket):
    """A user outside the daemon's group cannot enter the socket's directory: the client says
    which directory and whose group, as DAEMON_UNAVAILABLE (on which workers load locally)."""
    worker = Worker(user=NOBODY, group=NOBODY)
    try:
        with pytest.raises(LoraCacheError) as refused:
            worker.call("connect", socket=str(locked_socket))
    finally:
        worker.close()
    assert refused.value.code is ErrorCode.DAEMON_UNAVAILABLE
    assert (f"{locked_socket.parent} is not open to user nobody (it belongs to group root, mode "
            "0750)" in refused.value.message)


@pytest.fixture
def outsider(daemon):
    """A worker of another user *outside* the daemon's group that can still reach the socket
    (a socket left open to all): it cannot map the daemon's files."""
    daemon.socket.chmod(0o666)
    worker = Worker(daemon.socket, user=NOBODY, group=NOBODY)
    yield worker
    worker.close()


@pytest.fixture
def contained(daemon):
    """A worker given the daemon's socket but not its /dev/shm, as a container without the
    host's IPC namespace: it cannot map the daemon's files either."""
    worker = Worker(daemon.socket, private_shm=True)
    yield worker
    worker.close()


@pytest.mark.parametrize("worker", ["outsider", "contained"])
def test_a_handle_the_worker_cannot_map_is_given_back(daemon, lora_dir, worker, request):
    worker = request.getfixturevalue(worker)
    path = sized_lora(lora_dir / "a.safetensors", MiB)
    with pytest.raises(LoraCacheError) as refused:
        worker.call("acquire", path=str(path))
    assert refused.value.code is ErrorCode.MAPPING_FAILED
    assert "cannot open the daemon's shared-memory file" in refused.value.message
    wait_until(lambda: daemon.stats().leases == 0, timeout=5)  # nothing leaks
    with daemon.client() as client:  # and the entry is idle: it can be evicted
        assert client.evict(path) == DropResult(evicted=1, busy=0)


def test_fusing_falls_back_to_a_local_load_with_one_warning(daemon, lora_dir, contained):
    pipe = tiny_sd_pipeline(smallest=True)
    for name in "ab":
        save(sd_lora_peft(pipe, seed=ord(name)), lora_dir / f"{name}.safetensors")
    contained.call("pipeline", name="p")
    contained.call("pipeline", name="reference")
    contained.call("fuse", name="p", path=str(lora_dir / "a.safetensors"), adapter="a")
    contained.call("fuse", name="p", path=str(lora_dir / "b.safetensors"), adapter="b")
    warnings = [w for w in contained.call("warnings") if "without sharing" in w]
    assert len(warnings) == 1 and "shared-memory file" in warnings[0]
    assert daemon.stats().leases == 0
    assert daemon.cpu_stats().loads == 1  # b was not loaded for a worker that cannot map
    contained.call("unfuse", name="p")  # fused from the worker's own copies, undone exactly
    distance = contained.call("max_diff", a="p", b="reference")
    assert distance["diff"] <= 1e-5 * max(1.0, distance["scale"])
