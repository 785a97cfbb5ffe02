"""The ``loracache`` command against a live daemon and against none."""

from __future__ import annotations

import grp
import json
import os
import re
import signal
import socket as unix
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from tests.support import Daemon, write_lora

CLI = [sys.executable, "-m", "loracache.client.cli"]
MiB = 1 << 20
DEVICE_FIELDS = {"device", "budget", "used", "pinned_bytes", "entries", "leases", "sessions",
                 "hits", "misses", "hit_rate", "evictions", "loads", "load_seconds"}
ENTRY_FIELDS = {"path", "device", "layout", "nbytes", "leases", "pinned", "idle_s"}


def environment(socket=None, **extra: str) -> dict[str, str]:
    """This process's environment without any LORACACHE_* variable but those given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORACACHE_")}
    if socket is not None:
        env["LORACACHE_SOCKET"] = str(socket)
    return {**env, **extra}


def cli(*args: str, socket=None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``loracache ARGS``; ``socket`` goes in $LORACACHE_SOCKET."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60,
                          env=environment(socket, **(env or {})))


def cli_json(*args: str, socket) -> Any:
    """The parsed output of ``loracache ARGS --json``, which must succeed."""
    result = cli(*args, "--json", socket=socket)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def cpu_stats(socket) -> dict[str, Any]:
    (cpu,) = cli_json("stats", socket=socket)["devices"]
    assert cpu["device"] == "cpu" and DEVICE_FIELDS <= set(cpu), cpu
    return cpu


def table(text: str, first_column: str) -> list[dict[str, str]]:
    """The rows of a table the CLI printed, as {header: cell}, cut at the headers' positions
    (cells may hold single spaces, "1.0 MiB", and may be empty)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_column))
    header, rows = lines[start], lines[start + 1:]
    rows = rows[:rows.index("")] if "" in rows else rows  # up to the next table
    columns = [(m.group(), m.start()) for m in re.finditer(r"\S+(?: \S+)*", header)]
    ends = [begin for _, begin in columns[1:]] + [None]
    return [{name: row[begin:end].strip() for (name, begin), end in zip(columns, ends)}
            for row in rows]


def listed(socket) -> dict[str, dict[str, Any]]:
    """``loracache ls --json`` by file name."""
    entries = cli_json("ls", socket=socket)
    for entry in entries:
        assert ENTRY_FIELDS <= set(entry), entry
    return {Path(e["path"]).name: e for e in entries}


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory) -> Iterator[Daemon]:
    """One daemon for the tests that need only an answer, not counters of their own."""
    lora_dir = tmp_path_factory.mktemp("loras")
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(16)})
    daemon = Daemon(lora_dir)
    yield daemon
    daemon.cleanup()


# ------------------------------------------------------------------------------- live daemon

def test_stats_and_ls_as_tables_and_json(daemon, lora_dir):
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(1 << 18)})
    with daemon.client() as client, client.acquire("a.safetensors"):
        stats = json.loads(cli("stats", "--json", socket=daemon.socket).stdout)
        (cpu,) = stats["devices"]
        assert cpu["entries"] == 1 and cpu["leases"] == 1 and cpu["used"] == 1 << 20
        table_text = cli("stats", socket=daemon.socket).stdout
        assert "1.0 MiB" in table_text and "ENTRIES" in table_text
        (entry,) = json.loads(cli("ls", "--json", socket=daemon.socket).stdout)
        assert entry["path"] == str(lora_dir / "a.safetensors") and entry["leases"] == 1
        listing = cli("ls", socket=daemon.socket).stdout
        assert str(lora_dir / "a.safetensors") in listing and "1.0 MiB" in listing


def test_stats_counts_a_known_sequence(daemon, lora_dir):
    """Counters after: nothing; a pinned preload (1 load); an acquire (a hit) held; its release."""
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(1 << 18)})  # 1 MiB
    counters = ("used", "pinned_bytes", "entries", "leases", "sessions", "hits", "misses",
                "evictions", "loads")
    before = cpu_stats(daemon.socket)
    assert {k: before[k] for k in counters} == dict.fromkeys(counters, 0)
    assert (before["budget"], before["hit_rate"], before["load_seconds"]["count"],
            before["load_seconds"]["p50"]) == (1 << 30, None, 0, None)

    preload = cli("preload", "a.safetensors", "--pin", socket=daemon.socket)
    assert preload.stdout == f"{lora_dir / 'a.safetensors'} on cpu (raw): 1.0 MiB, pinned\n"
    with daemon.client() as client, client.acquire("a.safetensors"):
        during = cpu_stats(daemon.socket)
        printed = cli("stats", socket=daemon.socket).stdout
        (row,) = table(printed, "DEVICE")
        (host,) = table(printed, "TIER")  # no cache_dir: the host tier alone
    assert {k: during[k] for k in counters} == {
        "used": MiB, "pinned_bytes": MiB, "entries": 1, "leases": 1, "sessions": 1, "hits": 1,
        "misses": 0, "evictions": 0, "loads": 1}
    assert during["hit_rate"] == 1.0
    times = during["load_seconds"]
    assert times["count"] == 1 and times["sum"] > 0
    assert times["p50"] == times["p90"] == times["p99"] == times["sum"]  # one load
    bounds, counts = zip(*times["buckets"])
    assert bounds[-1] == "+Inf" and list(bounds[:-1]) == sorted(bounds[:-1])
    assert list(counts) == sorted(counts) and counts[-1] == 1  # cumulative
    assert (row["DEVICE"], row["BUDGET"], row["USED"], row["PINNED"], row["ENTRIES"],
            row["LEASES"], row["SESSIONS"], row["HITS"], row["HIT RATE"], row["LOADS"]) == (
        "cpu", "1.0 GiB", "1.0 MiB", "1.0 MiB", "1", "1", "1", "1", "100%", "1")
    assert re.fullmatch(r"(\d+ ms|\d+\.\ds) / .+ / .+", row["LOAD p50 / p90 / p99"]), row
    assert (host["TIER"], host["USED"], host["ENTRIES"], host["MISSES"]) == ("host", "0 B", "0",
                                                                          "1"), host

    after = cpu_stats(daemon.socket)  # the client said goodbye
    assert (after["leases"], after["sessions"], after["entries"]) == (0, 0, 1)
    # The command itself opens no session: an idle daemon reports none.
    assert cli_json("stats", socket=daemon.socket)["sessions"] == 0


def test_ls_json_and_table(shared_daemon):
    """A pinned, a leased and an idle entry: their fields, human sizes and idle time."""
    daemon, lora_dir = shared_daemon, shared_daemon.lora_dir
    write_lora(lora_dir / "pinned.safetensors", {"w": torch.ones(1 << 18)})  # 1 MiB
    write_lora(lora_dir / "leased.safetensors", {"w": torch.ones(1 << 19)})  # 2 MiB
    write_lora(lora_dir / "idle.safetensors", {"w": torch.ones(1 << 8)})  # 1 KiB
    for name, flags in (("pinned", ["--pin"]), ("idle", ["--layout", "raw"])):
        assert cli("preload", f"{name}.safetensors", *flags, socket=daemon.socket).returncode == 0
    with daemon.client() as client, client.acquire("leased.safetensors"):
        time.sleep(0.1)
        entries = listed(daemon.socket)
        rows = {Path(r["LORA"]).name: r for r in table(cli("ls", socket=daemon.socket).stdout,
                                                       "LORA")}
    expected = {"pinned": (MiB, 0, True), "leased": (2 * MiB, 1, False),
                "idle": (1 << 10, 0, False)}
    for name, (nbytes, leases, pinned) in expected.items():
        entry = entries[f"{name}.safetensors"]
        assert entry["path"] == str(lora_dir / f"{name}.safetensors"), entry
        assert (entry["device"], entry["layout"], entry["nbytes"], entry["leases"],
                entry["pinned"]) == ("cpu", "raw", nbytes, leases, pinned), entry
    assert entries["pinned.safetensors"]["idle_s"] == entries["leased.safetensors"]["idle_s"] == 0
    assert entries["idle.safetensors"]["idle_s"] >= 0.1
    assert {r["TIER"] for r in rows.values()} == {"device"}
    assert [(r["SIZE"], r["LEASES"], r["PINNED"], r["LAYOUT"]) for r in (
        rows["pinned.safetensors"], rows["leased.safetensors"], rows["idle.safetensors"])] == [
        ("1.0 MiB", "0", "yes", "raw"), ("2.0 MiB", "1", "", "raw"), ("1.0 KiB", "0", "", "raw")]
    assert rows["pinned.safetensors"]["IDLE"] == "0 ms"
    assert re.fullmatch(r"[1-9]\d* ms|\d+\.\ds", rows["idle.safetensors"]["IDLE"]), rows


def test_preload_pin_evict_clear_and_ping(daemon, lora_dir):
    for name in "abc":
        write_lora(lora_dir / f"{name}.safetensors", {"w": torch.ones(16)})
    assert "pinned" in cli("preload", "a.safetensors", "--pin", socket=daemon.socket).stdout
    raw = cli("preload", "b.safetensors", "--layout", "raw", socket=daemon.socket)
    assert raw.returncode == 0 and "(raw)" in raw.stdout and "pinned" not in raw.stdout
    assert cli("preload", "c.safetensors", socket=daemon.socket).returncode == 0
    with daemon.client(heartbeat=False) as client:
        assert [e.pinned for e in client.list()] == [True, False, False]
    evicted = cli("evict", "a.safetensors", socket=daemon.socket)
    assert evicted.stdout == "evicted 1, still leased 0\n"  # pinned entries go when named
    assert set(listed(daemon.socket)) == {"b.safetensors", "c.safetensors"}
    with daemon.client() as client, client.acquire("b.safetensors"):
        assert cli("evict", "--all", socket=daemon.socket).stdout == "evicted 1, still leased 1\n"
        assert set(listed(daemon.socket)) == {"b.safetensors"}
    assert "evicted 1" in cli("clear", socket=daemon.socket).stdout
    assert daemon.cpu_stats().entries == 0
    assert cli("ping", socket=daemon.socket).returncode == 0
    assert cli("--socket", str(daemon.socket), "ping").returncode == 0


def test_with_an_admin_socket_evict_clear_and_pin_are_served_only_there(start_daemon, lora_dir,
                                                                        tmp_path):
    """The main socket refuses them naming the admin socket; --socket ADMIN reaches it."""
    admin = tmp_path / "admin.sock"
    daemon = start_daemon("--admin-socket", str(admin),
                          "--admin-group", grp.getgrgid(os.getgid()).gr_name)
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(16)})
    for args in (["preload", "a.safetensors", "--pin"], ["evict", "a.safetensors"],
                 ["evict", "--all"], ["clear"]):
        refused = cli(*args, socket=daemon.socket)
        assert refused.returncode == 1 and "[NOT_ALLOWED]" in refused.stderr, refused.stderr
        assert str(admin) in refused.stderr
    assert cli("preload", "a.safetensors", socket=daemon.socket).returncode == 0
    pinned = cli("--socket", str(admin), "preload", "a.safetensors", "--pin")
    assert pinned.returncode == 0 and "pinned" in pinned.stdout, pinned.stderr
    assert listed(admin)["a.safetensors"]["pinned"] is True
    assert cli("clear", "--socket", str(admin)).stdout == "evicted 1, still leased 0\n"
    assert daemon.cpu_stats().entries == 0
    # Without --socket, the admin commands find the admin socket as the others find theirs.
    config = tmp_path / "config.toml"
    config.write_text(f'socket = "{daemon.socket}"\nadmin_socket = "{admin}"\n')
    assert cli("--config", str(config), "preload", "a.safetensors", "--pin").returncode == 0
    assert cli("--config", str(config), "evict", "--all").stdout == "evicted 1, still leased 0\n"
    assert cli("--config", str(config), "ping").returncode == 0  # the main socket
    by_env = cli("clear", socket=daemon.socket, env={"LORACACHE_ADMIN_SOCKET": str(admin)})
    assert by_env.returncode == 0, by_env.stderr


@pytest.mark.parametrize("args, message", [
    (["evict"], "one of the arguments path --all is required"),
    (["evict", "a.safetensors", "--all"], "not allowed with"),
])
def test_evict_needs_exactly_one_of_path_and_all(args, message, tmp_path):
    result = cli(*args, socket=tmp_path / "never-reached.sock")
    assert result.returncode == 2 and "usage: loracache evict" in result.stderr
    assert message in result.stderr


@pytest.mark.parametrize("args, code", [
    (["preload", "missing.safetensors"], "NOT_FOUND"),
    (["preload", "/etc/passwd"], "FORBIDDEN_PATH"),
    (["preload", "a.safetensors", "--layout", "bogus"], "BAD_REQUEST"),
    (["preload", "a.safetensors", "--device", "cuda:GPU-0123"], "UNKNOWN_DEVICE"),
], ids=["missing file", "outside the LoRA dirs", "unknown layout", "device not served"])
def test_errors_from_the_daemon_exit_1_with_the_code(shared_daemon, args, code):
    result = cli(*args, socket=shared_daemon.socket)
    assert result.returncode == 1 and f"[{code}]" in result.stderr, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [
    ["clear", "--device", "nonsense"],
    ["preload", "a.safetensors", "--device", "cuda:0"],  # a GPU index, where torch has no CUDA
], ids=["clear --device nonsense", "preload --device cuda:0"])
def test_a_device_the_cli_cannot_name_is_a_message_not_a_traceback(shared_daemon, args):
    result = cli(*args, socket=shared_daemon.socket)
    assert "Traceback" not in result.stderr, f"the CLI crashed:\n{result.stderr}"
    assert result.returncode in (1, 2) and result.stderr.startswith("loracache"), result.stderr
    assert args[-1] in result.stderr


# ------------------------------------------------------------------------------ --watch

def watch(socket: Path, *args: str, seconds: float = 1.5) -> tuple[int, str, str]:
    """``loracache stats --watch 0.2 ARGS`` run for ``seconds``, then interrupted (Ctrl-C)."""
    proc = subprocess.Popen([*CLI, "stats", "--watch", "0.2", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment(socket))
    time.sleep(seconds)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err


def test_watch_prints_a_table_every_interval_until_interrupted(shared_daemon):
    code, out, err = watch(shared_daemon.socket)
    assert code == 0 and err == ""
    headers = [line for line in out.splitlines() if line.startswith("DEVICE ")]
    summaries = re.findall(r"(?m)^\d\d:\d\d:\d\d daemon \w+ \(pid \d+\)", out)
    assert len(headers) >= 3 and len(summaries) >= len(headers), out


def test_watch_json_prints_one_object_per_line(shared_daemon):
    code, out, err = watch(shared_daemon.socket, "--json")
    assert code == 0 and err == ""
    objects = [json.loads(line) for line in out.splitlines()]
    assert len(objects) >= 3
    assert all(o["pid"] == shared_daemon.proc.pid and o["devices"] for o in objects)
    assert [o["uptime_s"] for o in objects] == sorted(o["uptime_s"] for o in objects)


# ------------------------------------------------------------------------ finding the socket

LOOKUPS = {  # name: (arguments, environment); {live}, {absent}: sockets, {good}, {bad}: files
    "--socket before the command": (["--socket", "{live}", "ping"], {}),
    "--socket after the command": (["ping", "--socket", "{live}"], {}),
    "LORACACHE_SOCKET": (["ping"], {"LORACACHE_SOCKET": "{live}"}),
    "--config before the command": (["--config", "{good}", "ping"], {}),
    "--config after the command": (["ping", "--config", "{good}"], {}),
    "LORACACHE_CONFIG": (["ping"], {"LORACACHE_CONFIG": "{good}"}),
    "--socket beats LORACACHE_SOCKET": (["ping", "--socket", "{live}"],
                                        {"LORACACHE_SOCKET": "{absent}"}),
    "LORACACHE_SOCKET beats --config": (["ping", "--config", "{bad}"],
                                        {"LORACACHE_SOCKET": "{live}"}),
    "--socket beats --config": (["--config", "{bad}", "ping", "--socket", "{live}"], {}),
}


@pytest.mark.parametrize("args, env", LOOKUPS.values(), ids=LOOKUPS.keys())
def test_socket_lookup(shared_daemon, tmp_path, args, env):
    """--socket > $LORACACHE_SOCKET > the config file's socket; options before or after."""
    names = {"live": str(shared_daemon.socket), "absent": str(tmp_path / "absent.sock"),
             "good": str(tmp_path / "good.toml"), "bad": str(tmp_path / "bad.toml")}
    Path(names["good"]).write_text(f"socket = {json.dumps(names['live'])}\n")
    Path(names["bad"]).write_text(f"socket = {json.dumps(names['absent'])}\n")
    result = subprocess.run([*CLI, *(a.format(**names) for a in args)], capture_output=True,
                            text=True, timeout=60,
                            env=environment(**{k: v.format(**names) for k, v in env.items()}))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {shared_daemon.socket} answered in "), result.stdout
    assert f"pid {shared_daemon.proc.pid})" in result.stdout


# ---------------------------------------------------------------------------------- no daemon

NO_DAEMON = [["stats"], ["stats", "--json"], ["ls"], ["ls", "--json"], ["preload", "x"],
             ["evict", "--all"], ["clear"], ["ping"]]


@pytest.mark.parametrize("command", NO_DAEMON, ids=[" ".join(c) for c in NO_DAEMON])
def test_no_daemon_exits_2_naming_the_socket(tmp_path, command):
    socket = tmp_path / "absent.sock"
    result = cli(*command, socket=socket)
    assert result.returncode == 2 and result.stdout == ""
    assert str(socket) in result.stderr and "DAEMON_UNAVAILABLE" in result.stderr
    assert "systemctl status loracache" in result.stderr and "group loracache" in result.stderr


def test_a_socket_nobody_listens_on_exits_2(tmp_path):
    """A crashed daemon leaves its socket file behind: the CLI must still give up, and say so."""
    path = tmp_path / "stale.sock"
    listener = unix.socket(unix.AF_UNIX)
    listener.bind(str(path))
    listener.close()  # the file stays; connecting is refused
    started = time.monotonic()
    result = cli("ping", socket=path)
    assert result.returncode == 2 and str(path) in result.stderr, result.stderr
    assert "DAEMON_UNAVAILABLE" in result.stderr and "systemctl status loracache" in result.stderr
    assert time.monotonic() - started < 30  # not the 120 s request timeout


@pytest.mark.parametrize("content, message", [
    ("socket = = 1\n", "is not valid TOML"),
    (None, "does not exist"),
    ("socket = 5\n", "is not a path"),
], ids=["invalid TOML", "missing", "socket not a string"])
def test_a_bad_config_file_exits_2_naming_it(tmp_path, content, message):
    config = tmp_path / "config.toml"
    if content is not None:
        config.write_text(content)
    result = cli("--config", str(config), "ping")
    assert result.returncode == 2 and result.stdout == ""
    assert str(config) in result.stderr and message in result.stderr, result.stderr
