"""The daemon killed under workers that hold fused pipelines, then started again.

While it is down, new loads fall back to the worker's own copy; once it is back, each worker
opens a new session, leases again what it holds (checking it is the same file), and unfusing
takes out exactly what was fused.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.support import Worker, wait_until
from examples.tiny_models import save, sd_lora_peft, tiny_sd_pipeline


@pytest.fixture
def sd_loras(lora_dir):
    pipe = tiny_sd_pipeline(smallest=True)
    for name, seed in (("a", 1), ("b", 2), ("a2", 3)):
        save(sd_lora_peft(pipe, seed=seed), lora_dir / f"{name}.safetensors")
    return lora_dir


@pytest.fixture
def fused_worker():
    """A worker with two identical pipelines, "restarted" with LoRA a fused, "original" not."""
    workers = []

    def start(socket, path: str) -> Worker:
        worker = Worker(socket)
        workers.append(worker)
        for name in ("restarted", "original"):
            worker.call("pipeline", name=name)
        worker.call("fuse", name="restarted", path=path, adapter="a")
        return worker

    yield start
    for worker in workers:
        worker.kill()


def test_workers_lease_again_after_a_restart_and_unfuse_exactly(start_daemon, sd_loras,
                                                               fused_worker):
    first = start_daemon("--session-ttl", "30")
    worker = fused_worker(first.socket, str(sd_loras / "a.safetensors"))
    first.stop(signal.SIGKILL)

    started = time.monotonic()
    worker.call("fuse", name="restarted", path=str(sd_loras / "b.safetensors"), adapter="b")
    assert time.monotonic() - started < 10  # no wait for the 120 s request timeout
    assert any("loading LoRAs in this process" in w for w in worker.call("warnings"))

    second = start_daemon(reuse=first)
    worker.call("unfuse", name="restarted")  # renews (in this call, or the heartbeat's)
    wait_until(lambda: worker.call("lease_generations", name="restarted") == [1])
    cpu = second.cpu_stats()
    assert (cpu.entries, cpu.leases, cpu.sessions) == (1, 1, 1)
    assert any("restarted" in w for w in worker.call("warnings"))
    distance = worker.call("max_diff", a="restarted", b="original")
    assert distance["diff"] <= 1e-5 * max(1.0, distance["scale"])

    worker.call("delete", name="restarted")
    assert second.cpu_stats().leases == 0


def test_a_file_changed_while_the_daemon_was_down_is_not_swapped_in(start_daemon, sd_loras,
                                                                   fused_worker):
    path = sd_loras / "a.safetensors"
    first = start_daemon()
    worker = fused_worker(first.socket, str(path))
    first.stop(signal.SIGKILL)
    path.write_bytes((sd_loras / "a2.safetensors").read_bytes())  # same name, other tensors

    second = start_daemon(reuse=first)
    worker.call("unfuse", name="restarted")
    # The renewal may run in the heartbeat thread, still at it when unfuse returns.
    wait_until(lambda: any("changed on disk" in w for w in worker.call("warnings")))
    assert worker.call("lease_generations", name="restarted") == [0]  # the old copy stays
    distance = worker.call("max_diff", a="restarted", b="original")
    assert distance["diff"] <= 1e-5 * max(1.0, distance["scale"])
    wait_until(lambda: second.cpu_stats().leases == 0)  # the new lease was given back
    worker.call("delete", name="restarted")
