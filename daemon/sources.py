"""Remote LoRA sources (``https://``, ``s3://``, ``hf://``), their settings, and the operator's
allowlist.

A worker may name a LoRA by URL instead of a path under ``lora_dirs``. The daemon fetches it
only when the URL falls under one of the ``allow_sources`` prefixes: a worker must never make
the daemon fetch an arbitrary URL. URLs are brought to one canonical form before they are
compared, so that no spelling (``..`` segments, percent-encoding, a default port, upper-case
host names) gets a URL past a prefix it is not under.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from typing import Any, Mapping

from loracache.shared.errors import ErrorCode, LoraCacheError

# http:// only where the operator allows an http:// prefix (a mirror on the node's network).
SCHEMES = ("https", "http", "s3", "hf")
DEFAULT_PORTS = {"https": 443, "http": 80}
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")  # a Hub user, organisation or repo


@dataclasses.dataclass(frozen=True)
class RemoteSource:
    """A canonical URL: ``scheme://authority/path``. The authority is a host (lower case,
    without its default port), an S3 bucket or a Hub user or organisation; the path is
    percent-decoded. A Hub URL's revision is kept apart from its path (``hf://org/repo@rev/f``
    has the path ``/repo/f``), so that a prefix allows every revision of what it names."""

    scheme: str
    authority: str
    path: str  # starts with "/"; a prefix may end with "/"
    revision: str | None = None  # hf:// only: a branch, tag or commit

    @property
    def url(self) -> str:
        if self.revision is None:
            return f"{self.scheme}://{self.authority}{self.path}"
        repo, _, rest = self.path[1:].partition("/")
        revision = urllib.parse.quote(self.revision, safe="")
        return f"{self.scheme}://{self.authority}/{repo}@{revision}/{rest}"

    @property
    def origin(self) -> str:
        """``scheme://authority``: what ``[source."..."]`` settings are given for."""
        return f"{self.scheme}://{self.authority}"

    @property
    def hub_repo_id(self) -> str:
        return f"{self.authority}/{self.path[1:].partition('/')[0]}"

    @property
    def hub_filename(self) -> str:
        return self.path[1:].partition("/")[2]

    def under(self, prefix: RemoteSource) -> bool:
        """Whether this URL is ``prefix`` itself or, for a prefix ending in ``/``, below it."""
        if (self.scheme, self.authority) != (prefix.scheme, prefix.authority):
            return False
        if prefix.path.endswith("/"):
            return self.path.startswith(prefix.path)
        return self.path == prefix.path


def is_remote(requested: str) -> bool:
    """Whether a requested LoRA is a URL (else it is a path under ``lora_dirs``)."""
    return _URL.match(requested) is not None


def parse_source(text: str) -> RemoteSource:
    """A requested LoRA's URL, canonical; BAD_REQUEST saying what is wrong with it."""
    try:
        source = _parse(text, prefix=False)
    except ValueError as exc:
        raise LoraCacheError(ErrorCode.BAD_REQUEST, f"{text!r:.300}: {exc}") from None
    return source


def parse_prefix(text: str) -> RemoteSource:
    """An ``allow_sources`` entry, canonical; ValueError saying what is wrong with it."""
    return _parse(text, prefix=True)


def check_allowed(source: RemoteSource, allowed: tuple[RemoteSource, ...]) -> None:
    """FORBIDDEN_SOURCE unless ``source`` is under one of the ``allowed`` prefixes."""
    if any(source.under(prefix) for prefix in allowed):
        return
    raise LoraCacheError(
        ErrorCode.FORBIDDEN_SOURCE,
        f"{source.url} is not under allow_sources (allowed: "
        f"{', '.join(p.url for p in allowed) or 'none'}); the daemon fetches only from sources "
        "its operator allows: add a prefix with --allow-source or allow_sources in its "
        "configuration")


def _parse(text: str, prefix: bool, origin: bool = False) -> RemoteSource:
    if not isinstance(text, str) or not is_remote(text):
        raise ValueError("not a URL: use https://host/path, s3://bucket/key or "
                         "hf://org/repo[@revision]/file")
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"unsupported scheme {scheme!r}: use https://, http://, s3:// or hf://")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError("a query or fragment is not accepted: name the file by its path")
    if "@" in parts.netloc:
        raise ValueError("credentials in a URL are not accepted: give them to the daemon's "
                         "configuration instead")
    authority = _authority(scheme, parts)
    raw_path, revision = parts.path, None
    if scheme == "hf":
        raw_path, revision = _hub_path(raw_path, prefix)
    path = urllib.parse.unquote(raw_path, errors="strict")
    segments = path.split("/")[1:]
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        if segment in (".", "..") or (segment == "" and not (prefix and i == last)):
            raise ValueError("the path must not contain '.', '..' or empty segments")
        if any(ord(c) < 32 or ord(c) == 127 or c in "\\;" for c in segment):
            raise ValueError("the path must not contain control characters, '\\' or ';' "
                             "(some servers read them as path syntax)")
    if not prefix and not path.endswith(".safetensors"):
        raise ValueError("only .safetensors files are served")
    if prefix and not segments and scheme not in ("s3", "hf") and not origin:
        raise ValueError("a prefix names at least a path: https://host/ allows the whole host")
    if prefix and segments and not origin and not path.endswith(("/", ".safetensors")):
        raise ValueError("a prefix ends with '/' (everything below it) or names one "
                         ".safetensors file; as written it would allow nothing")
    if scheme == "hf" and not prefix and len(segments) < 2:
        raise ValueError("a Hub URL names a repository and a file: hf://org/repo/file")
    return RemoteSource(scheme, authority, path or "/", revision)


def _hub_path(path: str, prefix: bool) -> tuple[str, str | None]:
    """``/repo@revision/file`` as ``/repo/file`` and the revision (percent-decoded, so
    ``refs%2Fpr%2F1`` is ``refs/pr/1``)."""
    head, slash, rest = path[1:].partition("/")
    repo, at, revision = head.partition("@")
    if head and not _HUB_NAME.fullmatch(repo):
        raise ValueError(f"{repo!r} is not a Hub repository name")
    if not at:
        return path, None
    if prefix:
        raise ValueError("a prefix names no revision: hf://org/repo/ allows every revision")
    revision = urllib.parse.unquote(revision, errors="strict")
    if (not revision or any(ord(c) < 33 or ord(c) == 127 for c in revision)
            or any(part in ("", ".", "..") for part in revision.split("/"))):
        raise ValueError("the revision after '@' must be a branch, tag or commit")
    return f"/{repo}{slash}{rest}", revision


def _authority(scheme: str, parts: urllib.parse.SplitResult) -> str:
    host = parts.hostname
    if not host:
        raise ValueError("no host" if scheme != "s3" else "no bucket")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the port is not a number from 0 to 65535") from None
    if scheme == "s3":
        if port is not None or host != parts.netloc.lower():
            raise ValueError("an S3 URL names a bucket: s3://bucket/key")
        return host
    if scheme == "hf":  # Hub names keep their case
        if not _HUB_NAME.fullmatch(parts.netloc):
            raise ValueError("a Hub URL names a user or organisation: hf://org/repo/file")
        return parts.netloc
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    if port is None or port == DEFAULT_PORTS[scheme]:
        return host
    return f"{host}:{port}"


@dataclasses.dataclass(frozen=True)
class SourceSettings:
    """How the daemon reaches one host or bucket: a ``[source."scheme://authority"]`` table.
    Secrets are never written in the configuration (workers may read it): a header's value is
    read from an environment variable of the daemon, S3 credentials from the AWS variables or a
    profile."""

    headers_from_env: Mapping[str, str] = dataclasses.field(default_factory=dict)  # https, http
    endpoint: str | None = None  # s3: an S3-compatible store's URL
    region: str | None = None  # s3
    profile: str | None = None  # s3: an AWS profile (needs boto3)
    skip_signature: bool = False  # s3: a public bucket, asked without credentials


# The headers the HTTP client drops when a redirect leaves the host (reqwest's sensitive ones).
CREDENTIAL_HEADERS = ("authorization", "cookie")
SETTING_KEYS = {"https": ("headers_from_env",), "http": ("headers_from_env",),
                "s3": ("endpoint", "region", "profile", "skip_signature"), "hf": ()}


def parse_source_settings(origin: str, table: Any) -> tuple[str, SourceSettings]:
    """A ``[source."..."]`` table: its canonical ``scheme://authority`` and its settings;
    ValueError saying what is wrong."""
    source = _parse(origin, prefix=True, origin=True)
    if source.path != "/":
        raise ValueError("settings are per host or bucket: name it without a path, like "
                         "\"https://host\" or \"s3://bucket\"")
    if not isinstance(table, dict):
        raise ValueError("must be a table")
    allowed = SETTING_KEYS[source.scheme]
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        names = ", ".join(allowed) or "none (the Hub is reached by HF_ENDPOINT and HF_TOKEN)"
        raise ValueError(f"unknown key {unknown[0]!r} for {source.scheme}://; allowed: {names}")
    headers = table.get("headers_from_env", {})
    if not isinstance(headers, dict) or not all(
            isinstance(k, str) and k.lower() in CREDENTIAL_HEADERS and isinstance(v, str)
            and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v) for k, v in headers.items()):
        raise ValueError("headers_from_env maps Authorization or Cookie to the name of an "
                         "environment variable, like { Authorization = "
                         "\"CIVITAI_AUTHORIZATION\" }: only those headers are dropped when a "
                         "redirect leaves the host, so only they may carry a token")
    for key in ("endpoint", "region", "profile"):
        if not isinstance(table.get(key, ""), str):
            raise ValueError(f"{key} must be a string")
    endpoint = table.get("endpoint")
    if endpoint is not None and not re.match(r"https?://[^/]", endpoint):
        raise ValueError("endpoint must be an http:// or https:// URL")
    if not isinstance(table.get("skip_signature", False), bool):
        raise ValueError("skip_signature must be true or false")
    return source.origin, SourceSettings(dict(headers), endpoint, table.get("region"),
                                         table.get("profile"),
                                         table.get("skip_signature", False))
