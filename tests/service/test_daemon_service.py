"""The daemon as systemd runs it: sd_notify, SIGHUP reloads, SIGTERM, metrics and journald logs.

Each test starts a real ``loracache serve`` process; systemd's side of the protocol is played by
a real datagram socket given as ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from loracache.shared.errors import LoraCacheError
from tests.support import wait_until, write_lora

MIB = 1 << 20


class NotifyListener:
    """systemd's end of sd_notify: collects each datagram as a dict of its fields."""

    def __init__(self, path: Path, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + path.name if abstract else str(path))
        self.address = "@" + path.name if abstract else str(path)
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = 30.0) -> dict[str, str]:
        """The first message (received from now on, or already seen and not yet consumed)
        with ``key`` (equal to ``value`` if given); earlier ones are consumed."""
        deadline = time.monotonic() + timeout
        while True:
            while self.messages:
                message = self.messages.pop(0)
                if key in message and value in (None, message[key]):
                    return message
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                raise AssertionError(
                    f"no {key}={value or '*'} from the daemon in {timeout} s") from None
            self.messages.append(dict(line.split("=", 1) for line in data.splitlines()))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify")
    yield listener
    listener.close()


def write_config(path: Path, lora_dir: Path, **settings: str) -> Path:
    lines = [f'lora_dirs = ["{lora_dir}"]', *(f'{k} = "{v}"' for k, v in settings.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_watchdog_status_and_stopping(start_daemon, lora_dir, tmp_path, abstract):
    """READY=1 once it serves, WATCHDOG=1 at half of WATCHDOG_USEC with a STATUS= summary,
    STOPPING=1 on SIGTERM, which exits 0 and leaves no socket and no shared-memory file."""
    listener = NotifyListener(tmp_path / f"notify-{abstract}", abstract=abstract)
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(MIB // 4)})
    daemon = start_daemon(env={"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "400000"})
    ready = listener.wait_for("READY", "1")
    assert ready["STATUS"].startswith("0 entries")
    daemon.client().preload("a.safetensors")
    started = time.monotonic()
    pings = [listener.wait_for("WATCHDOG", "1") for _ in range(4)]
    assert time.monotonic() - started < 2.0  # every 0.2 s, not every few seconds
    assert pings[-1]["STATUS"].startswith("1 entries, 1.0 MiB of")
    assert daemon.shm_files()
    assert daemon.stop() == 0
    assert listener.wait_for("STOPPING", "1")
    assert not daemon.socket.exists() and daemon.shm_files() == []
    listener.close()


def test_watchdog_for_another_pid_is_ignored(start_daemon, listener):
    """WATCHDOG_PID names the process systemd watches; a child that inherits it must not ping."""
    start_daemon(env={"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "200000",
                      "WATCHDOG_PID": "1"})
    listener.wait_for("READY", "1")
    with pytest.raises(AssertionError, match="no WATCHDOG"):
        listener.wait_for("WATCHDOG", "1", timeout=1.0)


def test_sighup_with_a_smaller_budget_evicts_idle_entries(start_daemon, lora_dir, tmp_path,
                                                          listener):
    """A lower max_bytes evicts unleased entries at once (LRU first); leased ones stay usable."""
    for name in "abc":
        write_lora(lora_dir / f"{name}.safetensors", {"w": torch.full((MIB // 4,), 1.0)})
    config = write_config(tmp_path / "config.toml", lora_dir, max_bytes="4MiB")
    daemon = start_daemon(config=config, env={"NOTIFY_SOCKET": listener.address})
    listener.wait_for("READY", "1")
    with daemon.client() as client:
        client.preload("a.safetensors")
        client.preload("b.safetensors")
        lease = client.acquire("c.safetensors")
        write_config(config, lora_dir, max_bytes="1536KiB")
        daemon.proc.send_signal(signal.SIGHUP)
        assert int(listener.wait_for("RELOADING", "1")["MONOTONIC_USEC"]) > 0
        listener.wait_for("READY", "1")
        cpu = daemon.cpu_stats()
        assert cpu.budget == 1536 * 1024
        assert cpu.used == MIB and cpu.entries == 1 and cpu.evictions == 2
        assert [e.path for e in client.list()] == [str(lora_dir / "c.safetensors")]
        assert torch.equal(lease.tensors["w"], torch.ones(MIB // 4))
        lease.release()
    daemon.wait_for_log("configuration reloaded")


def test_sighup_with_a_bad_file_keeps_the_old_configuration(start_daemon, lora_dir, tmp_path,
                                                            listener):
    """An invalid file is logged and reported in STATUS=; the daemon serves on with the old
    settings, and a later good file applies."""
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(16)})
    config = write_config(tmp_path / "config.toml", lora_dir, max_bytes="8MiB")
    daemon = start_daemon(config=config, env={"NOTIFY_SOCKET": listener.address})
    listener.wait_for("READY", "1")
    for broken in ("max_bytes = [unclosed\n", 'lora_dirs = ["/nonexistent"]\n',
                   'max_bytes = "lots"\n' + config.read_text()):
        config.write_text(broken)
        daemon.proc.send_signal(signal.SIGHUP)
        listener.wait_for("RELOADING", "1")
        assert "last reload failed" in listener.wait_for("READY", "1")["STATUS"]
        assert daemon.cpu_stats().budget == 8 * MIB
        with daemon.client() as client:
            client.acquire("a.safetensors").release()  # the old lora_dirs still apply
    daemon.wait_for_log("reload failed, keeping the previous configuration", count=3)
    assert daemon.read_log().count("reload failed, keeping the previous configuration") == 3
    write_config(config, lora_dir, max_bytes="2MiB")
    daemon.proc.send_signal(signal.SIGHUP)
    assert "reload failed" not in listener.wait_for("READY", "1")["STATUS"]
    assert daemon.cpu_stats().budget == 2 * MIB


def test_sighup_applies_new_roots_to_new_loads(start_daemon, lora_dir, tmp_path):
    """Changed lora_dirs: files under the new root load, the old root is refused, and settings
    that need a restart (here the socket) are kept with a warning."""
    other = tmp_path / "other"
    other.mkdir()
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(16)})
    write_lora(other / "b.safetensors", {"w": torch.ones(16)})
    config = write_config(tmp_path / "config.toml", lora_dir)
    daemon = start_daemon(config=config)
    with daemon.client() as client:
        client.acquire("a.safetensors").release()
        config.write_text(f'lora_dirs = ["{other}"]\nshm_dir = "{tmp_path}"\n')
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for_log("configuration reloaded", timeout=30)
        client.acquire("b.safetensors").release()
        with pytest.raises(LoraCacheError) as refused:
            client.acquire(str(lora_dir / "a.safetensors"))
        assert refused.value.code == "FORBIDDEN_PATH"
    assert "shm_dir changed in the configuration; it applies after a restart" not in \
        daemon.read_log()  # the flag --shm-dir wins over the file: nothing changed
    assert daemon.stop() == 0


def test_sighup_with_a_shorter_session_ttl_keeps_live_sessions(start_daemon, lora_dir,
                                                              tmp_path):
    """Clients heartbeat by the TTL they were told at hello: a shorter TTL applies to sessions
    opened after the reload, and a heartbeating client keeps its leases."""
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(16)})
    config = write_config(tmp_path / "config.toml", lora_dir)
    config.write_text(config.read_text() + "session_ttl = 6\n")
    daemon = start_daemon(config=config)
    with daemon.client() as client, client.acquire("a.safetensors"):
        config.write_text(config.read_text().replace("session_ttl = 6", "session_ttl = 0.5"))
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for_log("configuration reloaded", timeout=30)
        time.sleep(2.5)  # five new TTLs, less than one old one
        assert daemon.cpu_stats().leases == 1
        with daemon.client() as newcomer:
            assert newcomer.session_ttl == 0.5
    assert "expired" not in daemon.read_log()


def test_metrics_endpoint_matches_stats(start_daemon, lora_dir):
    """Scraped over HTTP, every metric equals what ``stats`` reports at the same moment."""
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(MIB // 4)})
    daemon = start_daemon("--max-bytes", "64MiB", "--metrics-addr", "127.0.0.1:0")
    with daemon.client() as client:
        client.acquire("a.safetensors").release()
        lease = client.acquire("a.safetensors")
        with pytest.raises(LoraCacheError):
            client.acquire("missing.safetensors")
        stats = client.stats()
        metrics = _scrape(stats.metrics)
        lease.release()
    (cpu,) = stats.devices
    for metric, key in [("loracache_budget_bytes", "budget"), ("loracache_used_bytes", "used"),
                        ("loracache_entries", "entries"), ("loracache_leases", "leases"),
                        ("loracache_hits_total", "hits"), ("loracache_misses_total", "misses"),
                        ("loracache_loads_total", "loads"),
                        ("loracache_evictions_total", "evictions"),
                        ("loracache_leased_bytes", "leased_bytes"),
                        ("loracache_device_sessions", "sessions")]:
        assert metrics[metric, (("device", "cpu"),)] == getattr(cpu, key), metric
    assert (cpu.hits, cpu.misses, cpu.leases, cpu.sessions) == (1, 1, 1, 1)
    assert metrics["loracache_sessions", ()] == stats.sessions >= 1
    assert metrics["loracache_errors_total", (("code", "NOT_FOUND"),)] == 1
    assert metrics["loracache_load_duration_seconds_count", (("device", "cpu"),)] == 1
    assert metrics["loracache_load_duration_seconds_bucket",
                   (("device", "cpu"), ("le", "+Inf"))] == 1
    # where the load's time went: one read and one upload (raw: nothing converted)
    for stage in ("read", "upload"):
        labels = (("device", "cpu"), ("stage", stage))
        assert metrics["loracache_load_stage_seconds_count", labels] == 1, stage
        assert metrics["loracache_load_stage_seconds_sum", labels] == pytest.approx(
            cpu.stage_seconds[stage].sum)
    assert ("loracache_load_stage_seconds_count", (("device", "cpu"), ("stage", "convert"))) \
        not in metrics
    (host,) = stats.tiers  # no cache_dir: no disk tier
    for metric, key in [("loracache_tier_budget_bytes", "budget"),
                        ("loracache_tier_used_bytes", "used"),
                        ("loracache_tier_entries", "entries"),
                        ("loracache_tier_hits_total", "hits"),
                        ("loracache_tier_misses_total", "misses"),
                        ("loracache_tier_evictions_total", "evictions")]:
        assert metrics[metric, (("tier", "host"),)] == getattr(host, key), metric
    assert host.misses == 1 and host.budget > 0  # the one load looked there first


def test_metrics_address_in_use_refuses_to_start(lora_dir, tmp_path):
    """A metrics port that cannot be bound is a configuration error: exit 2 with the address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "loracache.client.cli", "serve", "--socket",
             str(tmp_path / "s"), "--lora-dir", str(lora_dir), "--devices", "cpu",
             "--metrics-addr", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"127.0.0.1:{port}" in result.stderr and "cannot listen" in result.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("under_journald", [True, False], ids=["journal", "inherited"])
def test_log_lines_under_journald_carry_priorities_not_timestamps(lora_dir, tmp_path,
                                                                  under_journald):
    """With JOURNAL_STREAM naming our stderr, lines start with a syslog priority; a stream that
    is not ours (inherited from a parent under systemd) keeps the timestamps."""
    log_path = tmp_path / "stderr"
    with open(log_path, "w") as stderr:
        stat = os.fstat(stderr.fileno())
        stream = f"{stat.st_dev}:{stat.st_ino}" if under_journald else "1:1"
        proc = subprocess.Popen(
            [sys.executable, "-m", "loracache.client.cli", "serve", "--socket",
             str(tmp_path / "s"), "--lora-dir", str(lora_dir), "--devices", "cpu",
             "--cache-size", "-1"], stderr=stderr,
            env={**os.environ, "JOURNAL_STREAM": stream})
        assert proc.wait(60) == 2  # a config error goes to stderr as a plain message
        proc = subprocess.Popen(
            [sys.executable, "-m", "loracache.client.cli", "serve", "--socket",
             str(tmp_path / "s"), "--lora-dir", str(lora_dir), "--devices", "cpu"],
            stderr=stderr, env={**os.environ, "JOURNAL_STREAM": stream})
        try:
            _wait_for_text(log_path, "serving on")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    lines = log_path.read_text().splitlines()[1:]
    assert any("serving on" in line for line in lines)
    if under_journald:
        assert all(line.startswith("<6>loracache.daemon: ") for line in lines), lines
    else:
        assert all(line[:4].isdigit() and " INFO loracache.daemon: " in line for line in lines)


def _scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _wait_for_text(path: Path, text: str, timeout: float = 30.0) -> None:
    try:
        wait_until(lambda: text in path.read_text(), timeout)
    except AssertionError:
        raise AssertionError(
            f"{text!r} not in {path} after {timeout} s:\n{path.read_text()}") from None
