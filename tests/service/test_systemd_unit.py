"""The systemd packaging in systemd/: unit, sysusers snippet and example config.

`systemd-analyze` is required (`make test` installs Debian's systemd package when it is missing);
nothing is installed system-wide: each check works in a temporary root directory.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD_DIR / "loracache.service"
SYSUSERS = SYSTEMD_DIR / "loracache.sysusers"
CONFIG = SYSTEMD_DIR / "config.toml"

EXEC_START = "/opt/loracache/bin/loracache serve --config /etc/loracache/config.toml"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> directive -> every value assigned, in order (systemd allows repeats)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"line {number}: keep directives on one line"
        if line.startswith("["):
            assert line.endswith("]"), f"line {number}: bad section header {raw!r}"
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"line {number}: not a directive: {raw!r}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def last(section: dict[str, list[str]], key: str) -> str:
    assert key in section, f"{key}= missing"
    return section[key][-1]


def stub_root(root: Path, unit_text: str) -> None:
    """A root for `systemd-analyze verify --root`: the unit, stub binaries, default targets."""
    for binary in ("opt/loracache/bin/loracache", "bin/kill"):  # ExecStart=, ExecReload=
        path = root / binary
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(0o755)
    targets = root / "usr/lib/systemd/system"
    targets.mkdir(parents=True)
    for target in ("sysinit.target", "basic.target", "shutdown.target"):  # DefaultDependencies=
        (targets / target).write_text("[Unit]\nDescription=stub\n")  # an empty file means masked
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    (units / "loracache.service").write_text(unit_text)


def verify(root: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` of the unit installed in `root`."""
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze not found: `make test` installs Debian's systemd package"
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "info", "LC_ALL": "C"}
    return subprocess.run([tool, "verify", f"--root={root}", "--man=no", "loracache.service"],
                          check=False, capture_output=True, text=True, env=env, timeout=30)


def test_unit_verifies_cleanly(tmp_path: Path):
    """The shipped unit, byte for byte, passes `systemd-analyze verify` without a warning."""
    stub_root(tmp_path, UNIT.read_text())
    result = verify(tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and not output.strip(), (
        f"systemd-analyze verify (rc {result.returncode}):\n{output}")


@pytest.mark.parametrize("good, bad", [
    ("ProtectSystem=strict", "ProtectSytem=strict"),  # unknown directive
    ("Type=notify", "Type=notfy"),                    # bad value
    ("[Service]", "[Servic]"),                        # unknown section
])
def test_verify_catches_a_broken_unit(tmp_path: Path, good: str, bad: str):
    """The verify check above is sensitive: a typo makes it fail (some only warn, rc 0)."""
    text = UNIT.read_text()
    assert f"\n{good}\n" in text
    stub_root(tmp_path, text.replace(f"\n{good}\n", f"\n{bad}\n"))
    result = verify(tmp_path)
    assert result.returncode != 0 or (result.stdout + result.stderr).strip(), (
        f"a unit with {bad!r} verified cleanly")


def test_unit_directives():
    """The directives the daemon and the README rely on."""
    unit = parse_unit(UNIT.read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    expected = {
        "Type": "notify", "NotifyAccess": "main", "ExecStart": EXEC_START,
        "Restart": "on-failure", "RuntimeDirectory": "loracache", "RuntimeDirectoryMode": "0750",
        "User": "loracache", "Group": "loracache", "UMask": "0007", "LimitMEMLOCK": "infinity",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert last(service, key) == value, f"{key}={last(service, key)!r}, expected {value!r}"
    assert re.fullmatch(r"/bin/kill -(s )?HUP \$MAINPID", last(service, "ExecReload"))
    for key in ("WatchdogSec", "RestartSec", "TimeoutStopSec"):
        assert re.fullmatch(r"\d+(ms|s|min)?", last(service, key)), f"{key}= not a duration"
    assert last(service, "ProtectHome") in ("yes", "read-only", "tmpfs")
    assert last(service, "RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    # These would break the daemon: private /dev (GPUs, /dev/shm), hidden worker pids, CUDA JIT.
    for key in ("PrivateDevices", "PrivateIPC", "ProtectProc", "MemoryDenyWriteExecute"):
        assert key not in service, f"{key}= must not be set (see the unit's comments)"
    assert last(unit["Install"], "WantedBy") == "multi-user.target"


def test_sysusers_snippet_lines():
    """Well-formed sysusers.d lines; every SupplementaryGroups= group has an `m` line."""
    lines = [shlex.split(line) for line in SYSUSERS.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert {fields[0] for fields in lines} <= {"u", "g", "m"}, lines
    users = [fields for fields in lines if fields[0] == "u"]
    # u NAME ID GECOS HOME SHELL: dynamic system id, home /, the distribution's nologin shell.
    assert len(users) == 1 and len(users[0]) == 6, users
    assert users[0][1:3] == ["loracache", "-"] and users[0][4:] == ["/", "-"], users
    members = {fields[2] for fields in lines if fields[0] == "m"}
    assert all(len(fields) == 3 and fields[1] == "loracache" for fields in lines
               if fields[0] == "m"), lines
    groups = parse_unit(UNIT.read_text())["Service"].get("SupplementaryGroups", [])
    missing = {group for value in groups for group in value.split()} - members
    assert not missing, f"SupplementaryGroups= without an m line (start would fail): {missing}"


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_sysusers_creates_user_and_groups(tmp_path: Path):
    """`systemd-sysusers --root` creates the user, its group and the group memberships."""
    (tmp_path / "etc").mkdir()
    result = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)],
                            check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"systemd-sysusers:\n{result.stdout}{result.stderr}"
    passwd = {line.split(":")[0]: line.split(":")
              for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    group = {line.split(":")[0]: line.split(":")
             for line in (tmp_path / "etc/group").read_text().splitlines()}
    name, _, uid, gid, _, home, shell = passwd["loracache"]
    assert int(uid) < 1000 and home == "/" and shell.endswith("nologin"), passwd["loracache"]
    assert group["loracache"][2] == gid
    for extra in ("video", "render"):
        assert "loracache" in group[extra][3].split(","), group[extra]


def test_example_config():
    """systemd/config.toml is valid TOML with the schema's keys and GPU-host values."""
    config = tomllib.loads(CONFIG.read_text())
    assert config == {
        "socket": "/run/loracache/daemon.sock", "lora_dirs": ["/srv/loras"], "devices": ["all"],
        "max_bytes": "25%", "cache_size": 10, "session_ttl": 30, "acquire_timeout": 30,
        "shm_dir": "/dev/shm", "log_level": "info", "metrics_addr": "",
        "session_max_leases": 1024, "session_max_bytes": "",
    }


def test_example_config_commented_examples():
    """Uncommenting the `#key`/`#[table]` examples gives valid TOML in the schema."""
    text = CONFIG.read_text()
    for name in ("SOCKET", "LORA_DIRS", "DEVICES", "MAX_BYTES", "CACHE_SIZE", "SESSION_TTL",
                 "ACQUIRE_TIMEOUT", "SHM_DIR", "LOG_LEVEL", "METRICS_ADDR"):
        assert f"LORACACHE_{name}" in text, f"LORACACHE_{name} not documented"
    actives = ('metrics_addr = ""\n', 'session_max_bytes = ""\n')  # replaced by the examples
    for active in actives:
        text = text.replace(active, "")
    uncommented = re.sub(r"(?m)^#(?=[\[a-z])", "", text)
    config = tomllib.loads(uncommented)
    assert config["metrics_addr"] == "127.0.0.1:9464"
    assert set(config["device"]) == {"GPU-8f3c0a52-1d2e-4b6f-9a0c-3e5d7f9b1c24", "cpu"}
    for overrides in config["device"].values():
        assert set(overrides) <= {"max_bytes", "cache_size"}, overrides
    assert config["preload"] == [{"path": "styles/ink.safetensors", "device": "cuda:0",
                                  "layout": "sdxl", "pin": True}]
