"""Remote LoRA sources (``https://``, ``s3://``) and the operator's allowlist.

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

from loracache.shared.errors import ErrorCode, LoraCacheError

# http:// only where the operator allows an http:// prefix (a mirror on the node's network).
SCHEMES = ("https", "http", "s3")
DEFAULT_PORTS = {"https": 443, "http": 80}
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclasses.dataclass(frozen=True)
class RemoteSource:
    """A canonical URL: ``scheme://authority/path``. The authority is a host (lower case,
    without its default port) or an S3 bucket; the path is percent-decoded."""

    scheme: str
    authority: str
    path: str  # starts with "/"; a prefix may end with "/"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}{self.path}"

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


def _parse(text: str, prefix: bool) -> RemoteSource:
    if not isinstance(text, str) or not is_remote(text):
        raise ValueError("not a URL: use https://host/path, s3://bucket/key")
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"unsupported scheme {scheme!r}: use https://, http:// or s3://")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError("a query or fragment is not accepted: name the file by its path")
    if "@" in parts.netloc:
        raise ValueError("credentials in a URL are not accepted: give them to the daemon's "
                         "configuration instead")
    authority = _authority(scheme, parts)
    path = urllib.parse.unquote(parts.path, errors="strict")
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
    if prefix and not segments and scheme != "s3":
        raise ValueError("a prefix names at least a path: https://host/ allows the whole host")
    return RemoteSource(scheme, authority, path or "/")


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
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    if port is None or port == DEFAULT_PORTS[scheme]:
        return host
    return f"{host}:{port}"
