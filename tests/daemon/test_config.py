"""daemon/config.py alone: precedence and sources, validation messages, per-device overrides,
rendering, reloads and the shipped example file."""

from __future__ import annotations

import dataclasses
import grp
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from loracache.daemon.config import (SETTINGS, ConfigError, DaemonConfig, DeviceOverride,
                                     PreloadSpec, SizeSpec, load_config, reloaded,
                                     render_config)
from loracache.shared.endpoints import fallback_socket_path

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "config.toml"
GPU = "GPU-8f3c0a52-1d2e-4b6f-9a0c-3e5d7f9b1c24"
GiB = 2**30
GROUPS = sorted(group.gr_name for group in grp.getgrall())[:3]  # admin_group must exist


def toml(table: dict[str, Any]) -> str:
    """Top-level ``key = value`` lines (JSON literals of strings, numbers, bools and lists are
    valid TOML)."""
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def with_tmp(value: Any, tmp: Path) -> Any:
    """``value`` with ``{tmp}`` in its strings and paths replaced by the test's directory."""
    if isinstance(value, dict):
        return {key: with_tmp(v, tmp) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(with_tmp(v, tmp) for v in value)
    if isinstance(value, Path):
        return Path(with_tmp(str(value), tmp))
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    return value


def without_origin(config: DaemonConfig) -> DaemonConfig:
    """The configuration's values alone: which file they came from set aside."""
    return dataclasses.replace(config, file=None, sources={})


# --------------------------------------------------------------------------------- precedence

# For each setting that has all three sources: the flag people type, the default, and a
# (raw value, parsed value) for the file, the environment and the flag.
PRECEDENCE = [
    ("socket", "--socket", fallback_socket_path(),
     ("{tmp}/file.sock", Path("{tmp}/file.sock")), ("{tmp}/env.sock", Path("{tmp}/env.sock")),
     ("{tmp}/flag.sock", Path("{tmp}/flag.sock"))),
    ("lora_dirs", "--lora-dir", None,
     (["{tmp}/file"], (Path("{tmp}/file"),)),
     (f"{{tmp}}/env1{os.pathsep}{{tmp}}/env2", (Path("{tmp}/env1"), Path("{tmp}/env2"))),
     (["{tmp}/flag", "{tmp}/file"], (Path("{tmp}/flag"), Path("{tmp}/file")))),
    ("devices", "--devices", ("all",), (["cpu"], ("cpu",)),
     ("cpu,cuda:0", ("cpu", "cuda:0")), ("cuda:GPU-12ab", ("cuda:GPU-12ab",))),
    ("max_bytes", "--max-bytes", SizeSpec(percent=25.0), ("8GiB", SizeSpec(nbytes=8 * GiB)),
     ("40%", SizeSpec(percent=40.0)), ("1000", SizeSpec(nbytes=1000))),
    ("cache_size", "--cache-size", 10, (3, 3), ("0", 0), ("5", 5)),
    ("session_ttl", "--session-ttl", 30.0, (12, 12.0), ("1.5", 1.5), ("7", 7.0)),
    ("acquire_timeout", "--acquire-timeout", 30.0, (0, 0.0), ("2.5", 2.5), ("9", 9.0)),
    ("shm_dir", "--shm-dir", Path("/dev/shm"), ("{tmp}/file", Path("{tmp}/file")),
     ("{tmp}/env1", Path("{tmp}/env1")), ("{tmp}/flag", Path("{tmp}/flag"))),
    ("log_level", "--log-level", "info", ("debug", "debug"), ("WARNING", "warning"),
     ("error", "error")),
    ("metrics_addr", "--metrics-addr", None, ("127.0.0.1:9000", ("127.0.0.1", 9000)),
     (":9001", ("0.0.0.0", 9001)), ("[::1]:9002", ("::1", 9002))),
    ("session_max_leases", "--session-max-leases", 1024, (8, 8), ("16", 16), ("32", 32)),
    ("session_max_bytes", "--session-max-bytes", None, ("4GiB", SizeSpec(nbytes=4 * GiB)),
     ("10%", SizeSpec(percent=10.0)), ("1000", SizeSpec(nbytes=1000))),
    ("admin_socket", "--admin-socket", None, ("{tmp}/file.admin", Path("{tmp}/file.admin")),
     ("{tmp}/env.admin", Path("{tmp}/env.admin")), ("{tmp}/flag.admin", Path("{tmp}/flag.admin"))),
    ("admin_group", "--admin-group", None, *[(group, group) for group in GROUPS]),
]


@pytest.mark.parametrize("name, flag, default, file, env, flag_value", PRECEDENCE,
                         ids=[case[0] for case in PRECEDENCE])
def test_default_file_environment_flag_precedence_and_sources(tmp_path, name, flag, default,
                                                              file, env, flag_value):
    """Each later source wins, and sources[name] says which one gave the value."""
    tmp = tmp_path.resolve()
    for directory in ("file", "env1", "env2", "flag", "loras"):
        (tmp / directory).mkdir()
    # lora_dirs has no default, so the other settings get it from a flag.
    base = {} if name == "lora_dirs" else {"lora_dirs": [str(tmp / "loras")]}
    if name == "admin_socket":  # an admin socket needs the group that owns it
        base["admin_group"] = GROUPS[0]
    config_file = tmp / "config.toml"
    env_name = f"LORACACHE_{name.upper()}"
    stages = [  # (file table, environment, flags, expected value, expected source)
        ({}, {}, base, default, "default"),
        ({name: file[0]}, {}, base, file[1], f"file {config_file}"),
        ({name: file[0]}, {env_name: env[0]}, base, env[1], f"environment {env_name}"),
        ({name: file[0]}, {env_name: env[0]}, {**base, name: flag_value[0]}, flag_value[1],
         f"flag {flag}"),
    ]
    for table, environ, flags, expected, source in with_tmp(stages, tmp):
        write(config_file, toml(table))
        if name == "lora_dirs" and source == "default":
            with pytest.raises(ConfigError, match="lora_dirs is not set"):
                load_config(flags, config_file=str(config_file), environ=environ)
            continue
        config = load_config(flags, config_file=str(config_file), environ=environ)
        assert (getattr(config, name), config.sources[name]) == (expected, source), source


def test_an_empty_environment_variable_counts_as_unset(tmp_path, lora_dir):
    """LORACACHE_X= (empty, as systemd's Environment= may leave it) falls back to the file."""
    config_file = write(tmp_path / "c.toml", toml({"cache_size": 3, "log_level": "debug"}))
    config = load_config({"lora_dirs": [str(lora_dir)]}, config_file=str(config_file),
                         environ={"LORACACHE_CACHE_SIZE": "", "LORACACHE_LOG_LEVEL": ""})
    assert (config.cache_size, config.log_level) == (3, "debug")
    assert config.sources["cache_size"] == f"file {config_file}"


@pytest.mark.parametrize("name", ["session_max_bytes", "admin_socket", "admin_group"])
def test_an_empty_string_in_the_file_means_not_set(tmp_path, lora_dir, name):
    """Optional settings are switched off with "" (what --print-config writes for them)."""
    config_file = write(tmp_path / "c.toml", toml({name: ""}))
    config = load_config({"lora_dirs": [str(lora_dir)]}, config_file=str(config_file),
                         environ={})
    assert (getattr(config, name), config.sources[name]) == (None, f"file {config_file}")


def test_tables_come_only_from_the_file(tmp_path, lora_dir):
    """device and preload have no environment variable: LORACACHE_DEVICE is not read."""
    config = load_config({"lora_dirs": [str(lora_dir)]}, config_file=None, environ={
        "LORACACHE_DEVICE": "garbage", "LORACACHE_PRELOAD": "garbage"})
    assert (config.device, config.preload) == ({}, ())
    assert config.sources["device"] == config.sources["preload"] == "default"


# ------------------------------------------------------------------------- the file itself

def test_config_file_argument_beats_loracache_config(tmp_path, lora_dir):
    """An explicit --config wins over $LORACACHE_CONFIG; without it the variable names the file."""
    explicit = write(tmp_path / "explicit.toml", toml({"cache_size": 1}))
    from_env = write(tmp_path / "env.toml", toml({"cache_size": 2}))
    flags, environ = {"lora_dirs": [str(lora_dir)]}, {"LORACACHE_CONFIG": str(from_env)}
    config = load_config(flags, config_file=str(explicit), environ=environ)
    assert (config.file, config.cache_size) == (explicit, 1)
    config = load_config(flags, environ=environ)
    assert (config.file, config.cache_size, config.sources["cache_size"]) == (
        from_env, 2, f"file {from_env}")


def test_an_explicit_environ_is_the_only_environment_read(tmp_path, lora_dir, monkeypatch):
    """load_config(environ={...}) must not look at the process's own $LORACACHE_CONFIG."""
    monkeypatch.setenv("LORACACHE_CONFIG", str(tmp_path / "process-env.toml"))  # no such file
    try:
        config = load_config({"lora_dirs": [str(lora_dir)]}, environ={})
    except ConfigError as exc:
        pytest.fail(f"environ={{}} was given, yet the process's LORACACHE_CONFIG was read: {exc}")
    assert config.file is None


@pytest.mark.parametrize("how", ["argument", "LORACACHE_CONFIG"])
def test_a_named_file_that_does_not_exist_is_an_error(tmp_path, lora_dir, how):
    """A file someone asked for must not be silently skipped."""
    missing = tmp_path / "nowhere.toml"
    argument = str(missing) if how == "argument" else None
    environ = {"LORACACHE_CONFIG": str(missing)} if how == "LORACACHE_CONFIG" else {}
    with pytest.raises(ConfigError) as error:
        load_config({"lora_dirs": [str(lora_dir)]}, config_file=argument, environ=environ)
    assert str(missing) in str(error.value) and "does not exist" in str(error.value)


def test_invalid_toml_is_an_error_naming_the_file(tmp_path, lora_dir):
    broken = write(tmp_path / "broken.toml", "cache_size = = 3\n")
    with pytest.raises(ConfigError) as error:
        load_config({"lora_dirs": [str(lora_dir)]}, config_file=str(broken), environ={})
    assert str(broken) in str(error.value) and "not valid TOML" in str(error.value)


def test_an_unknown_key_is_an_error_listing_the_keys(tmp_path, lora_dir):
    """A typo (max_byte) must not be ignored while the daemon runs with the default."""
    config_file = write(tmp_path / "typo.toml", toml({"max_byte": "8GiB"}))
    with pytest.raises(ConfigError) as error:
        load_config({"lora_dirs": [str(lora_dir)]}, config_file=str(config_file), environ={})
    message = str(error.value)
    assert str(config_file) in message and "'max_byte'" in message
    assert all(setting.name in message for setting in SETTINGS)


# ------------------------------------------------------------------------------- validation

LONG_SOCKET = "/tmp/" + "s" * 110 + ".sock"

# (where the value comes from, setting, value, a word of what is allowed). Values may hold
# {tmp}; "file" values are TOML-typed, "env" ones strings, "flag" ones as argparse gives them.
INVALID = [
    ("env", "max_bytes", "lots", "not a size"),
    ("env", "max_bytes", "0", "positive"),
    ("file", "max_bytes", 0, "positive"),
    ("file", "max_bytes", -5, "positive"),
    ("flag", "max_bytes", "150%", "(0, 100]"),
    ("file", "max_bytes", "0%", "(0, 100]"),
    ("file", "max_bytes", True, "not a size"),
    ("file", "cache_size", -1, "whole number"),
    ("env", "cache_size", "x", "whole number"),
    ("file", "cache_size", 1.5, "whole number"),
    ("file", "cache_size", True, "whole number"),
    ("flag", "session_ttl", "0", "> 0"),
    ("file", "session_ttl", -1, "> 0"),
    ("env", "session_ttl", "abc", "number of seconds"),
    ("file", "acquire_timeout", -1, ">= 0"),
    ("flag", "devices", "tpu", "cpu, cuda"),
    ("file", "devices", [], "cpu, cuda"),
    ("file", "devices", [1], "list of strings"),
    ("flag", "socket", LONG_SOCKET, "107 bytes"),
    ("file", "socket", "", "non-empty path"),
    ("file", "socket", 5, "path"),
    ("env", "lora_dirs", "{tmp}/missing", "not a directory"),
    ("flag", "shm_dir", "{tmp}/missing", "not a directory"),
    ("file", "lora_dirs", [], "at least one directory"),
    ("env", "log_level", "loud", "debug, info, warning"),
    ("flag", "metrics_addr", "nohost", "HOST:PORT"),
    ("env", "metrics_addr", "h:99999", "0-65535"),
    ("file", "metrics_addr", 9464, "HOST:PORT"),
    ("file", "session_max_leases", 0, ">= 1"),
    ("env", "session_max_leases", "-1", "whole number"),
    ("env", "session_max_bytes", "lots", "not a size"),
    ("file", "session_max_bytes", "0%", "(0, 100]"),
    ("flag", "admin_socket", LONG_SOCKET, "107 bytes"),
    ("file", "admin_socket", 5, "path"),
    ("env", "admin_group", "no-such-group-lc", "getent group"),
    ("file", "admin_group", 0, "group name"),
]


@pytest.mark.parametrize("via, name, value, allowed", INVALID,
                         ids=[f"{c[1]}={c[2]!r}"[:40] for c in INVALID])
def test_invalid_values_name_key_value_source_and_what_is_allowed(tmp_path, lora_dir, via, name,
                                                                  value, allowed):
    value = with_tmp(value, tmp_path)
    config_file = write(tmp_path / "c.toml", toml({name: value} if via == "file" else {}))
    environ = {f"LORACACHE_{name.upper()}": value} if via == "env" else {}
    flags = {} if name == "lora_dirs" else {"lora_dirs": [str(lora_dir)]}
    flags.update({name: value} if via == "flag" else {})
    source = {"file": f"file {config_file}", "env": f"environment LORACACHE_{name.upper()}",
              "flag": f"flag --{name.replace('_', '-')}"}[via]
    with pytest.raises(ConfigError) as error:
        load_config(flags, config_file=str(config_file), environ=environ)
    message = str(error.value)
    assert message.startswith(f"{name} = {repr(value)[:60]}"), message
    assert f"(from {source}" in message and allowed in message, message


def test_lora_dirs_not_set_anywhere_says_how_to_set_it():
    with pytest.raises(ConfigError) as error:
        load_config({}, environ={})
    message = str(error.value)
    assert all(way in message for way in ("--lora-dir DIR", "LORACACHE_LORA_DIRS",
                                          "lora_dirs in the configuration file")), message


TABLE_ERRORS = {
    "device max_bytes": (f'[device."{GPU}"]\nmax_bytes = "lots"\n',
                         [f'[device."{GPU}"] max_bytes', "'lots'", "not a size"]),
    "device unknown key": ('[device."cpu"]\nmax_byte = "1GiB"\n',
                           ['[device."cpu"]', "'max_byte'", "max_bytes, cache_size"]),
    "device cache_size": ('[device."cpu"]\ncache_size = -1\n',
                          ['[device."cpu"] cache_size', "-1", "whole number"]),
    "device name": ('[device."cuda:0"]\nmax_bytes = "1GiB"\n',
                    ['[device."cuda:0"]', '"cpu"', "GPU UUID"]),
    "preload without path": ('[[preload]]\ndevice = "cpu"\n',
                             ["[[preload]] #1", "path must be"]),
    "preload layout": ('[[preload]]\npath = "a.safetensors"\n\n'
                       '[[preload]]\npath = "b.safetensors"\nlayout = "sd4"\n',
                       ["[[preload]] #2", "'sd4'", "raw, sd, sdxl"]),
    "preload cast layout": ('[[preload]]\npath = "a.safetensors"\nlayout = "raw:F16"\n',
                            ["[[preload]] #1", "'raw:F16'", "sdxl:F16"]),
    "preload device": ('[[preload]]\npath = "a.safetensors"\ndevice = "all"\n',
                       ["[[preload]] #1", "'all'", "cpu, cuda"]),
    "preload pin": ('[[preload]]\npath = "a.safetensors"\npin = "yes"\n',
                    ["[[preload]] #1", "pin must be true or false"]),
    "preload unknown key": ('[[preload]]\npath = "a.safetensors"\npinned = true\n',
                            ["[[preload]] #1", "'pinned'", "path, device, layout, pin"]),
}


@pytest.mark.parametrize("text, expected", TABLE_ERRORS.values(), ids=TABLE_ERRORS.keys())
def test_invalid_device_and_preload_tables(tmp_path, lora_dir, text, expected):
    """Table errors name the table, the key or value at fault, the file and what is allowed."""
    config_file = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError) as error:
        load_config({"lora_dirs": [str(lora_dir)]}, config_file=str(config_file), environ={})
    message = str(error.value)
    assert f"(from file {config_file})" in message, message
    assert all(part in message for part in expected), message


# ------------------------------------------------------------------------ per-device values

def test_per_device_overrides_and_global_fallback(tmp_path, lora_dir):
    """A [device] table changes only its device; the others keep the daemon-wide values."""
    config_file = write(tmp_path / "c.toml", toml({"max_bytes": "10%", "cache_size": 4}) + f"""
[device."{GPU}"]
max_bytes = "40GiB"
cache_size = 50

[device."cuda:MIG-0a1b2c"]
max_bytes = "50%"

[device."cpu"]
cache_size = 0
""")
    config = load_config({"lora_dirs": [str(lora_dir)]}, config_file=str(config_file),
                         environ={})
    assert set(config.device) == {f"cuda:{GPU}", "cuda:MIG-0a1b2c", "cpu"}
    total = 100 * GiB
    assert [config.budget(d, total) for d in (f"cuda:{GPU}", "cuda:MIG-0a1b2c", "cpu",
                                              "cuda:GPU-other")] == [
        40 * GiB, 50 * GiB, 10 * GiB, 10 * GiB]
    assert [config.cache_size_for(d) for d in (f"cuda:{GPU}", "cuda:MIG-0a1b2c", "cpu",
                                               "cuda:GPU-other")] == [50, 4, 0, 4]
    assert config.budget("cpu", 1001) == 100  # percentages round down to whole bytes


# ---------------------------------------------------------------------------------- rendering

def full_config(tmp_path: Path, lora_name: str = "loras") -> DaemonConfig:
    """A configuration with every setting away from its default, from all three sources."""
    dirs = [tmp_path / lora_name, tmp_path / "more", tmp_path / "shm", tmp_path / "downloads"]
    for directory in dirs:
        directory.mkdir()
    config_file = write(tmp_path / "c.toml", toml({
        "devices": ["cpu", f"cuda:{GPU}"], "max_bytes": "12.5%", "session_ttl": 2.5,
        "shm_dir": str(dirs[2]), "session_max_leases": 3, "session_max_bytes": "1GiB",
        "admin_socket": str(tmp_path / "admin.sock"), "admin_group": GROUPS[0],
        "allow_sources": ["s3://loras/team/", "hf://org/", "https://civitai.com/api/"],
        "cache_dir": str(dirs[3]), "cache_max_bytes": "50GiB", "cache_min_free_bytes": "1%",
        "source_revalidate_s": 60, "source_timeout_s": 5, "host_max_bytes": "2GiB"}) + f"""
[source."s3://loras"]
endpoint = "http://minio.local:9000"
region = "eu-west-1"
skip_signature = true

[source."https://civitai.com"]
headers_from_env = {{ Authorization = "CIVITAI_AUTHORIZATION" }}

[device."{GPU}"]
max_bytes = "40GiB"
cache_size = 50

[device."cpu"]
cache_size = 0

[[preload]]
path = "styles/ink.safetensors"
device = "cuda:0"
layout = "sdxl:F16"
pin = true

[[preload]]
path = "plain.safetensors"
""")
    return load_config(
        {"lora_dirs": [str(d) for d in dirs[:2]], "metrics_addr": "127.0.0.1:9464"},
        config_file=str(config_file),
        environ={"LORACACHE_SOCKET": str(tmp_path / "d.sock"), "LORACACHE_CACHE_SIZE": "7",
                 "LORACACHE_ACQUIRE_TIMEOUT": "0", "LORACACHE_LOG_LEVEL": "debug"})


def test_full_config_has_the_values_it_was_given(tmp_path):
    """The fixture of the rendering tests is what it claims (so the round trip means something)."""
    config = full_config(tmp_path)
    assert config.device == {f"cuda:{GPU}": DeviceOverride(SizeSpec(nbytes=40 * GiB), 50),
                             "cpu": DeviceOverride(cache_size=0)}
    assert config.preload == (PreloadSpec("styles/ink.safetensors", "cuda:0", "sdxl:F16", True),
                              PreloadSpec("plain.safetensors"))
    assert (config.max_bytes, config.cache_size, config.acquire_timeout, config.metrics_addr) == (
        SizeSpec(percent=12.5), 7, 0.0, ("127.0.0.1", 9464))
    assert (config.session_max_leases, config.session_max_bytes, config.admin_group) == (
        3, SizeSpec(nbytes=GiB), GROUPS[0])


@pytest.mark.parametrize("lora_name", ["loras", "lorás", "loras-\N{GRINNING FACE}"])
def test_rendered_config_reloads_to_the_same_values(tmp_path, lora_name):
    """--print-config output is a configuration file that gives back the same configuration."""
    config = full_config(tmp_path, lora_name)
    text = render_config(config)
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        pytest.fail(f"render_config wrote invalid TOML for lora_dirs {config.lora_dirs}: {exc}")
    rendered = write(tmp_path / "rendered.toml", text)
    again = load_config({}, config_file=str(rendered), environ={})
    assert without_origin(again) == without_origin(config)
    assert set(again.sources.values()) == {f"file {rendered}"}


def test_rendered_lines_carry_their_source(tmp_path):
    config = full_config(tmp_path)
    lines = render_config(config).splitlines()
    assert lines[0] == f"# configuration file: {config.file}"
    top_level = lines[:lines.index("")]  # the tables follow the first blank line
    for setting in SETTINGS:
        if setting.from_file_only:
            headers = [line for line in lines if line.startswith(f"[{setting.name}")
                       or line.startswith(f"[[{setting.name}")]
            assert headers and all(line.endswith(f"  # {config.sources[setting.name]}")
                                   for line in headers), (setting.name, headers)
        else:
            (line,) = [line for line in top_level if line.startswith(f"{setting.name} = ")]
            assert line.endswith(f"  # {config.sources[setting.name]}"), line
    sources = {config.sources[name] for name in ("socket", "metrics_addr", "max_bytes")}
    assert sources == {"environment LORACACHE_SOCKET", "flag --metrics-addr",
                       f"file {config.file}"}


def test_default_config_renders_metrics_off_and_reloads(tmp_path, lora_dir):
    config = load_config({"lora_dirs": [str(lora_dir)]}, environ={})
    text = render_config(config)
    assert 'metrics_addr = ""  # default' in text and "# configuration file: none" in text
    rendered = write(tmp_path / "rendered.toml", text)
    assert without_origin(load_config({}, config_file=str(rendered), environ={})) == \
        without_origin(config)


# ------------------------------------------------------------------------------------ reload

def test_reload_keeps_what_cannot_change_and_takes_the_rest(tmp_path):
    """Sockets, devices, shm_dir and metrics_addr are bound at start; the rest follow the file."""
    for directory in ("old", "new"):
        (tmp_path / directory).mkdir()

    def config(which: str, port: int, size: str, cache: int) -> DaemonConfig:
        return load_config({
            "socket": str(tmp_path / f"{which}.sock"), "lora_dirs": [str(tmp_path / which)],
            "admin_socket": str(tmp_path / f"{which}.admin"), "admin_group": GROUPS[0],
            "shm_dir": str(tmp_path / which), "metrics_addr": f"127.0.0.1:{port}",
            "max_bytes": size, "cache_size": cache,
            "devices": "cpu" if which == "old" else "cpu,cuda"}, environ={})

    old, new = config("old", 9000, "1GiB", 3), config("new", 9001, "2GiB", 5)
    merged, kept = reloaded(old, new)
    assert kept == ["admin_socket", "devices", "metrics_addr", "shm_dir", "socket"]
    for setting in SETTINGS:
        source = old if setting.name in kept else new
        assert getattr(merged, setting.name) == getattr(source, setting.name), setting.name
    assert (merged.max_bytes, merged.cache_size, merged.lora_dirs) == (
        SizeSpec(nbytes=2 * GiB), 5, ((tmp_path / "new").resolve(),))
    assert merged.socket == tmp_path / "old.sock" and merged.devices == ("cpu",)
    assert reloaded(old, old) == (old, [])


# ------------------------------------------------------------------------ the shipped example

def uncomment_examples(text: str, section: str) -> str:
    """The example file with the commented-out TOML (``#key``, ``#[table]``) of the paragraph
    that mentions ``section`` uncommented, replacing an active line with the same key."""
    paragraphs = text.split("\n\n")
    (index,) = [i for i, p in enumerate(paragraphs) if section in p]
    examples = re.findall(r"(?m)^#([\[a-z].*)$", paragraphs[index])
    keys = {line.split(" = ")[0] for line in examples if " = " in line}
    active = [line for line in paragraphs[index].splitlines()
              if not (line.split(" = ")[0] in keys and not line.startswith("#"))]
    paragraphs[index] = re.sub(r"(?m)^#(?=[\[a-z])", "", "\n".join(active))
    return "\n\n".join(paragraphs)


def load_example(tmp_path: Path, text: str, **flags: Any) -> DaemonConfig:
    """``text`` as the configuration file, with the host-specific paths moved to tmp_path."""
    (tmp_path / "loras").mkdir()
    example = write(tmp_path / "config.toml", text)
    return load_config({"socket": str(tmp_path / "d.sock"),
                        "lora_dirs": [str(tmp_path / "loras")], **flags},
                       config_file=str(example), environ={})


def test_shipped_example_documents_every_setting():
    """The example says "each key's environment variable is named below": all of them."""
    text = EXAMPLE.read_text()
    missing = [s.name for s in SETTINGS if (f"[{s.name}" if s.from_file_only else s.env)
               not in text]
    assert missing == [], f"systemd/config.toml does not document {missing}"


def test_shipped_example_config_loads(tmp_path):
    config = load_example(tmp_path, EXAMPLE.read_text())
    assert (config.devices, config.max_bytes, config.cache_size, config.session_ttl,
            config.acquire_timeout, config.shm_dir, config.log_level, config.metrics_addr,
            config.session_max_leases, config.session_max_bytes, config.admin_socket) == (
        ("all",), SizeSpec(percent=25.0), 10, 30.0, 30.0, Path("/dev/shm"), "info", None,
        1024, None, None)
    assert config.sources["max_bytes"] == f"file {tmp_path / 'config.toml'}"


@pytest.mark.parametrize("section, check", [
    ("#metrics_addr", lambda c: c.metrics_addr == ("127.0.0.1", 9464)),
    ("#session_max_bytes", lambda c: c.session_max_bytes == SizeSpec(percent=50.0)),
    ("#admin_socket", lambda c: c.admin_socket == Path("/run/loracache/admin.sock")),
    ("Per-device overrides", lambda c: c.device == {
        f"cuda:{GPU}": DeviceOverride(SizeSpec(nbytes=40 * GiB), 50),
        "cpu": DeviceOverride(SizeSpec(nbytes=8 * GiB))}),
    ("[[preload]]", lambda c: c.preload == (
        PreloadSpec("styles/ink.safetensors", "cuda:0", "sdxl", True),)),
], ids=["metrics_addr", "session_max_bytes", "admin_socket", "device", "preload"])
def test_shipped_example_with_its_examples_uncommented_loads(tmp_path, section, check):
    """The commented examples are what the daemon accepts and mean what they say (the
    example's admin group is replaced by one that exists here)."""
    text = uncomment_examples(EXAMPLE.read_text(), section)
    assert text != EXAMPLE.read_text()
    assert check(load_example(tmp_path, text, admin_group=GROUPS[0]))


def test_an_admin_socket_without_its_group_is_refused(tmp_path):
    """Owned by the daemon's own group, the admin socket would let every client evict."""
    with pytest.raises(ConfigError, match="admin_group is not"):
        load_config({"lora_dirs": [str(tmp_path)], "admin_socket": str(tmp_path / "a.sock")},
                    environ={})
