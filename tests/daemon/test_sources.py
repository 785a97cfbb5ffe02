"""Remote sources: the canonical form URLs are compared in, and the allowlist."""

from __future__ import annotations

import pytest

from loracache.daemon.config import ConfigError, load_config
from loracache.daemon.sources import (check_allowed, is_remote, parse_prefix, parse_source,
                                       parse_source_settings)
from loracache.shared.errors import ErrorCode, LoraCacheError


@pytest.mark.parametrize("text, url", [
    ("https://Example.COM/loras/a.safetensors", "https://example.com/loras/a.safetensors"),
    ("https://example.com:443/a.safetensors", "https://example.com/a.safetensors"),
    ("https://example.com:8443/a.safetensors", "https://example.com:8443/a.safetensors"),
    ("http://127.0.0.1:80/a.safetensors", "http://127.0.0.1/a.safetensors"),
    ("HTTPS://example.com/my%20style.safetensors", "https://example.com/my style.safetensors"),
    ("s3://bucket/team/a.safetensors", "s3://bucket/team/a.safetensors"),
    ("http://[::1]:8080/a.safetensors", "http://[::1]:8080/a.safetensors"),
    ("http://[::1]:80/a.safetensors", "http://[::1]/a.safetensors"),
    ("hf://Org/repo/sub/a.safetensors", "hf://Org/repo/sub/a.safetensors"),
    ("hf://org/repo@v1.0/a.safetensors", "hf://org/repo@v1.0/a.safetensors"),
    ("hf://org/repo@refs%2Fpr%2F1/a.safetensors", "hf://org/repo@refs%2Fpr%2F1/a.safetensors"),
])
def test_urls_are_compared_in_one_canonical_form(text, url):
    assert is_remote(text) and parse_source(text).url == url


@pytest.mark.parametrize("text, why", [
    ("ftp://example.com/a.safetensors", "unsupported scheme"),
    ("https://example.com/a/../b.safetensors", "'..'"),
    ("https://example.com/a/%2e%2e/b.safetensors", "'..'"),
    ("https://example.com/a%2F..%2Fb.safetensors", "'..'"),
    ("https://example.com//b.safetensors", "empty segments"),
    ("https://example.com/a.safetensors?token=x", "query"),
    ("https://example.com/a.safetensors#x", "fragment"),
    ("https://user:pw@example.com/a.safetensors", "credentials"),
    ("https://example.com/a.bin", ".safetensors"),
    ("https://example.com:99999/a.safetensors", "port"),
    ("https:///a.safetensors", "no host"),
    ("s3://bucket:9000/a.safetensors", "names a bucket"),
    ("https://example.com/a%00.safetensors", "control characters"),
    ("https://example.com/team/..;/secret/a.safetensors", "';'"),
    ("https://example.com/team/%5C..%5Csecret/a.safetensors", "'\\'"),
    ("hf://org/a.safetensors", "a repository and a file"),
    ("hf://org/../repo/a.safetensors", "not a Hub repository name"),
    ("hf://org/repo@./loras/a.safetensors", "branch, tag or commit"),
    ("hf://org/repo@../a.safetensors", "branch, tag or commit"),
    ("hf://org/repo@refs%2F..%2Fmain/a.safetensors", "branch, tag or commit"),
    ("hf://org/repo@/a.safetensors", "branch, tag or commit"),
    ("hf://or%20g/repo/a.safetensors", "user or organisation"),
])
def test_urls_that_could_slip_past_a_prefix_are_refused(text, why):
    with pytest.raises(LoraCacheError) as error:
        parse_source(text)
    assert error.value.code is ErrorCode.BAD_REQUEST and why in error.value.message


def test_paths_are_not_remote():
    assert not is_remote("a.safetensors") and not is_remote("/srv/loras/a.safetensors")
    assert not is_remote("dir/https://x")


ALLOWED = (parse_prefix("https://example.com/team/"), parse_prefix("s3://models/loras/"),
           parse_prefix("https://cdn.example.com/one.safetensors"))


@pytest.mark.parametrize("url", [
    "https://example.com/team/a.safetensors", "https://EXAMPLE.com:443/team/sub/a.safetensors",
    "s3://models/loras/a.safetensors", "https://cdn.example.com/one.safetensors"])
def test_urls_under_an_allowed_prefix_pass(url):
    check_allowed(parse_source(url), ALLOWED)


@pytest.mark.parametrize("url", [
    "https://example.com/teammate/a.safetensors",  # a prefix ends at a segment
    "https://example.com/a.safetensors", "http://example.com/team/a.safetensors",
    "https://example.com:8443/team/a.safetensors", "https://evil.com/team/a.safetensors",
    "s3://models-2/loras/a.safetensors", "https://cdn.example.com/one/x.safetensors"])
def test_anything_else_is_a_forbidden_source_naming_the_setting(url):
    with pytest.raises(LoraCacheError) as error:
        check_allowed(parse_source(url), ALLOWED)
    assert error.value.code is ErrorCode.FORBIDDEN_SOURCE
    assert "allow_sources" in error.value.message and "--allow-source" in error.value.message


def test_nothing_is_allowed_by_default(tmp_path):
    config = load_config({"lora_dirs": [str(tmp_path)]}, environ={})
    assert config.allow_sources == () and config.cache_dir is None
    with pytest.raises(LoraCacheError, match="allowed: none"):
        check_allowed(parse_source("https://example.com/a.safetensors"), config.allow_sources)


def test_allow_sources_needs_a_cache_dir_and_valid_prefixes(tmp_path):
    loras, downloads = tmp_path / "loras", tmp_path / "downloads"
    loras.mkdir()
    downloads.mkdir()
    flags = {"lora_dirs": [str(loras)], "allow_sources": ["https://example.com/loras/"]}
    with pytest.raises(ConfigError, match="cache_dir"):
        load_config(flags, environ={})
    config = load_config({**flags, "cache_dir": str(downloads)}, environ={})
    assert [p.url for p in config.allow_sources] == ["https://example.com/loras/"]
    with pytest.raises(ConfigError, match="allow_sources = .*'..'"):
        load_config({**flags, "allow_sources": ["https://example.com/a/../"],
                     "cache_dir": str(downloads)}, environ={})
    environ = {"LORACACHE_ALLOW_SOURCES": "https://a.example/x/,s3://b/",
               "LORACACHE_CACHE_DIR": str(downloads)}
    config = load_config({"lora_dirs": [str(loras)]}, environ=environ)
    assert [p.url for p in config.allow_sources] == ["https://a.example/x/", "s3://b/"]


def test_the_cache_dir_may_not_overlap_a_lora_dir(tmp_path):
    (tmp_path / "loras" / "downloads").mkdir(parents=True)
    flags = {"lora_dirs": [str(tmp_path / "loras")], "allow_sources": ["https://example.com/"]}
    for cache_dir in (tmp_path / "loras", tmp_path / "loras" / "downloads", tmp_path):
        with pytest.raises(ConfigError, match="overlaps"):
            load_config({**flags, "cache_dir": str(cache_dir)}, environ={})


ALLOWED_HUB = (parse_prefix("hf://org/"), parse_prefix("hf://team/repo/"))


@pytest.mark.parametrize("url, allowed", [
    ("hf://org/any/a.safetensors", True), ("hf://org/any@v2/sub/a.safetensors", True),
    ("hf://team/repo@main/a.safetensors", True), ("hf://team/repo2/a.safetensors", False),
    ("hf://Org/any/a.safetensors", False),  # Hub names keep their case: no spelling gets in
    ("hf://evil/repo/a.safetensors", False)])
def test_a_hub_prefix_allows_every_revision_of_what_it_names(url, allowed):
    if allowed:
        check_allowed(parse_source(url), ALLOWED_HUB)
    else:
        with pytest.raises(LoraCacheError):
            check_allowed(parse_source(url), ALLOWED_HUB)


@pytest.mark.parametrize("prefix", ["s3://bucket/team", "hf://org/repo", "https://h/loras"])
def test_a_prefix_that_would_allow_nothing_is_refused(prefix):
    with pytest.raises(ValueError, match="allow nothing"):
        parse_prefix(prefix)


def test_a_prefix_names_no_hub_revision():
    with pytest.raises(ValueError, match="every revision"):
        parse_prefix("hf://org/repo@v1/")


@pytest.mark.parametrize("table, why", [
    ({"headers_from_env": {"X-Api-Key": "TOKEN"}}, "only they may carry a token"),
    ({"headers_from_env": {"Authorization": "not a name"}}, "environment variable"),
    ({"endpoint": "ftp://minio"}, "http:// or https://"),
    ({"region": 3}, "must be a string"),
    ({"skip_signature": "yes"}, "true or false"),
    ({"bucket": "x"}, "unknown key 'bucket'"),
])
def test_source_settings_are_checked(table, why):
    origin = "https://civitai.com" if "headers_from_env" in table else "s3://bucket"
    with pytest.raises(ValueError, match=why):
        parse_source_settings(origin, table)


def test_source_settings_are_per_host_or_bucket():
    assert parse_source_settings("HTTPS://Civitai.com:443", {
        "headers_from_env": {"Authorization": "CIVITAI"}})[0] == "https://civitai.com"
    with pytest.raises(ValueError, match="per host or bucket"):
        parse_source_settings("https://civitai.com/api/", {})
    with pytest.raises(ValueError, match="headers_from_env"):
        parse_source_settings("s3://bucket", {"headers_from_env": {"Authorization": "X"}})
