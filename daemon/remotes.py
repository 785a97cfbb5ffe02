"""Talking to remote sources: what a URL's file is now (its size and version), and its bytes.

Each scheme is served by its ecosystem's library, so loracache writes no HTTP, S3 or Hub
protocol code: ``https://``, ``http://`` and ``s3://`` by obstore, ``hf://`` by huggingface_hub.
Both run in the disk cache's download threads. Every failure becomes a LoraCacheError whose
code says what the worker can do: NOT_FOUND, SOURCE_DENIED (credentials), TOO_LARGE, or
SOURCE_FAILED (the source is away, timed out or cut the file off).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import os
import re
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import obstore
from obstore.store import HTTPStore, S3Store

from loracache.shared.errors import ErrorCode, LoraCacheError

from .sources import RemoteSource, SourceSettings

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig

CHUNK = 8 << 20
TRANSFER_TIMEOUT = "3600s"  # a whole request, body included: GBs at slow speeds
# obstore retries failed requests: a few, briefly, so a dead source fails in about a minute.
RETRIES: RetryConfig = {"max_retries": 2, "retry_timeout": datetime.timedelta(seconds=30)}
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Where obstore reads an S3 endpoint from the environment.
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")
# The errno values of a write that found no room: the disk cache evicts and tries again.
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """What a source says its file is now."""

    size: int
    version: str  # changes whenever the content may have: an ETag, a revision, a checksum
    sha256: str | None = None  # where the source publishes it (the Hub's LFS files)


class NoRoom(OSError):
    """The disk had no room for a download (ENOSPC, a quota, a file size limit)."""


# Called with what the source announced before its bytes are fetched: raises to refuse
# (TOO_LARGE), or makes room for them.
Admit = Callable[[RemoteFile], None]


class Remotes:
    """The sources of one daemon: a client per host or bucket, made on first use with the
    operator's ``[source."..."]`` settings, and the Hub."""

    def __init__(self, settings: Mapping[str, SourceSettings], timeout_s: float) -> None:
        """``timeout_s``: how long a source may send nothing, connecting or mid-file."""
        self.settings = settings
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._stores: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def head(self, source: RemoteSource) -> RemoteFile:
        """What ``source`` is now, asked without fetching its bytes."""
        if source.scheme == "hf":
            return _hub_head(source)
        with _fetching(source):
            meta = obstore.head(self._store(source), _key(source))
        return _object_file(meta)

    def download(self, source: RemoteSource, partial: Path, admit: Admit) -> RemoteFile:
        """Fetch ``source`` into the file ``partial``, refusing through ``admit`` before the
        bytes come; the file's size is checked against what the source announced."""
        if source.scheme == "hf":
            return _hub_download(source, partial, admit)
        with _fetching(source):
            result = obstore.get(self._store(source), _key(source))
        announced = _object_file(result.meta)
        admit(announced)
        written = 0
        with _fetching(source):
            with open(partial, "wb") as out:
                for chunk in result.stream(min_chunk_size=CHUNK):
                    written += len(chunk)
                    if written > announced.size:
                        raise LoraCacheError(ErrorCode.SOURCE_FAILED,
                                             f"{source.url} sent more than the "
                                             f"{announced.size} bytes it announced")
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        if written != announced.size:
            raise LoraCacheError(ErrorCode.SOURCE_FAILED, f"{source.url} was cut off: "
                                 f"{written} of {announced.size} bytes came")
        return announced

    def _store(self, source: RemoteSource) -> Any:
        """One client per host or bucket, so connections are reused."""
        key = (source.scheme, source.authority)
        with self._lock:
            if key not in self._stores:
                settings = self.settings.get(source.origin, SourceSettings())
                try:
                    self._stores[key] = _make_store(source, settings, self.timeout)
                except LoraCacheError:
                    raise
                except Exception as exc:
                    raise source_error(source, exc) from None
            return self._stores[key]


def _make_store(source: RemoteSource, settings: SourceSettings,
                timeout: datetime.timedelta) -> Any:
    client_options: ClientConfig = {"connect_timeout": timeout, "read_timeout": timeout,
                                    "timeout": TRANSFER_TIMEOUT}
    if source.scheme == "s3":
        s3: dict[str, Any] = {"skip_signature": settings.skip_signature}
        # obstore reads AWS_ALLOW_HTTP and AWS_ALLOW_INVALID_CERTIFICATES from the environment
        # only when it is given no client options at all; the daemon gives its own timeouts,
        # so it passes these on itself (an S3-compatible store at http://, by AWS_ENDPOINT_URL).
        if "AWS_ALLOW_HTTP" in os.environ:
            client_options["allow_http"] = _env_flag("AWS_ALLOW_HTTP")
        elif any(os.environ.get(name, "").startswith("http://") for name in ENDPOINT_VARIABLES):
            client_options["allow_http"] = True  # the operator named an http:// endpoint
        if "AWS_ALLOW_INVALID_CERTIFICATES" in os.environ:
            client_options["allow_invalid_certificates"] = _env_flag(
                "AWS_ALLOW_INVALID_CERTIFICATES")
        if settings.endpoint:
            s3["endpoint"] = settings.endpoint
            client_options["allow_http"] = settings.endpoint.startswith("http://")
        if settings.region:
            s3["region"] = settings.region
        return S3Store(source.authority, client_options=client_options, retry_config=RETRIES,
                       credential_provider=_profile_credentials(settings.profile), **s3)
    headers = {}
    for header, variable in settings.headers_from_env.items():
        value = os.environ.get(variable)
        if not value:
            # the daemon's configuration, not the source's answer: copies stay in service
            raise LoraCacheError(ErrorCode.SOURCE_FAILED,
                                 f"{source.origin}: header {header} comes from the environment "
                                 f"variable {variable}, which the daemon does not have; set it "
                                 "in the daemon's environment (EnvironmentFile= under systemd)")
        headers[header] = value
    client_options["allow_http"] = source.scheme == "http"
    if headers:
        # reqwest drops these when a redirect leaves the host, so a token reaches only its host
        client_options["default_headers"] = headers
    return HTTPStore.from_url(source.origin, retry_config=RETRIES, client_options=client_options)


def _env_flag(variable: str) -> bool:
    """A true-or-false environment variable, read as obstore reads it."""
    value = os.environ[variable].strip().lower()
    if value in ("1", "true", "on", "yes", "y"):
        return True
    if value in ("0", "false", "off", "no", "n", ""):
        return False
    raise LoraCacheError(ErrorCode.SOURCE_FAILED, f"the daemon's environment variable "
                         f"{variable}={os.environ[variable]!r} is neither true nor false")


def _profile_credentials(profile: str | None) -> Any:
    """Credentials of an AWS profile (``~/.aws/config`` and ``credentials``, SSO), by boto3;
    without a profile, obstore reads the AWS variables, web identity and instance roles."""
    if profile is None:
        return None
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        raise LoraCacheError(ErrorCode.SOURCE_FAILED,
                             f"profile = {profile!r} needs boto3 to read AWS profiles: "
                             "pip install boto3, or give credentials by the AWS_* variables"
                             ) from None
    return Boto3CredentialProvider(boto3.Session(profile_name=profile))


def _key(source: RemoteSource) -> str:
    return source.path.lstrip("/")


def _object_file(meta: Any) -> RemoteFile:
    etag = meta.get("e_tag")
    if etag:
        return RemoteFile(int(meta["size"]), f"etag:{etag}")
    modified = meta.get("last_modified")
    return RemoteFile(int(meta["size"]),
                      f"size:{meta['size']}:modified:{modified.isoformat() if modified else ''}")


# ---------------------------------------------------------------------------------- the Hub

def _hub_offline() -> bool:
    """HF_HUB_OFFLINE, as huggingface_hub read it. Its ``constants`` is a submodule that the
    package does not import by itself: ``huggingface_hub.constants`` alone is an
    AttributeError until something else has imported it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_head(source: RemoteSource) -> RemoteFile:
    return _hub_metadata(source)[0]


def _hub_metadata(source: RemoteSource) -> tuple[RemoteFile, str | None]:
    """What the Hub says the file is now, and the commit its revision resolves to."""
    import huggingface_hub

    if _hub_offline():
        raise LoraCacheError(ErrorCode.SOURCE_FAILED,
                             f"{source.url}: HF_HUB_OFFLINE is set, so the daemon does not ask "
                             "the Hub; it serves only what it or the Hub cache already has")
    repo_id, filename = source.hub_repo_id, source.hub_filename
    try:
        meta = huggingface_hub.get_hf_file_metadata(
            huggingface_hub.hf_hub_url(repo_id, filename, revision=source.revision))
    except Exception as exc:
        raise source_error(source, exc) from None
    if meta.size is None or meta.etag is None:
        raise LoraCacheError(ErrorCode.SOURCE_FAILED,
                             f"{source.url}: the Hub did not say the file's size and ETag")
    etag = meta.etag.strip('"')
    return (RemoteFile(meta.size, f"etag:{etag}", etag if _SHA256.fullmatch(etag) else None),
            meta.commit_hash)


def _hub_download(source: RemoteSource, partial: Path, admit: Admit) -> RemoteFile:
    """The file from the Hub, or from the Hub's own cache when HF_HUB_OFFLINE is set."""

    offline = _hub_offline()
    announced, commit = (None, None) if offline else _hub_metadata(source)
    if announced is not None:
        admit(announced)
    folder = partial.with_name(partial.name + ".hub")
    try:
        with _fetching(source):
            fetched = _hub_file(source, commit, offline, folder)
            size = fetched.stat().st_size
            if announced is None:  # from the Hub cache: its blob is named by its hash
                announced = _hub_cached_file(fetched, size)
                admit(announced)
            if size != announced.size:
                raise LoraCacheError(ErrorCode.SOURCE_FAILED, f"{source.url} was cut off: "
                                     f"{size} of {announced.size} bytes came")
            shutil.copyfile(fetched, partial) if offline else os.replace(fetched, partial)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return announced


def _hub_file(source: RemoteSource, commit: str | None, offline: bool, folder: Path) -> Path:
    import huggingface_hub

    # The commit just resolved, so a branch that moves meanwhile cannot swap the file.
    return Path(huggingface_hub.hf_hub_download(
        source.hub_repo_id, source.hub_filename, revision=commit or source.revision,
        local_files_only=offline, local_dir=None if offline else folder))


def _hub_cached_file(fetched: Path, size: int) -> RemoteFile:
    blob = fetched.resolve().name
    sha256 = blob if _SHA256.fullmatch(blob) else None
    return RemoteFile(size, f"etag:{blob}", sha256)


# ------------------------------------------------------------------------------ the errors

@contextlib.contextmanager
def _fetching(source: RemoteSource) -> Iterator[None]:
    """What fetching ``source`` raises, translated: our errors as they are, a full disk as
    NoRoom (the disk cache makes room and tries again), the libraries' by source_error."""
    try:
        yield
    except (LoraCacheError, NoRoom):
        raise
    except OSError as exc:
        if exc.errno in NO_ROOM:
            raise NoRoom(exc.errno, str(exc)) from None
        raise source_error(source, exc) from None
    except Exception as exc:  # cut off, timed out, refused
        raise source_error(source, exc) from None


def source_error(source: RemoteSource, exc: BaseException) -> LoraCacheError:
    """The code and message for a library's exception while fetching ``source``."""
    from huggingface_hub import errors as hub

    if isinstance(exc, LoraCacheError):
        return exc
    if isinstance(exc, hub.LocalEntryNotFoundError):
        return LoraCacheError(ErrorCode.SOURCE_FAILED,
                              f"{source.url}: the Hub could not be reached and the file is in "
                              f"no cache ({reason(exc)})")
    if isinstance(exc, hub.RepositoryNotFoundError) and not isinstance(exc, hub.GatedRepoError):
        return LoraCacheError(ErrorCode.NOT_FOUND,  # the Hub's answer for a private repo too
                              f"{source.url}: the Hub has no such repository, or it is private "
                              "and the daemon has no token for it (HF_TOKEN)")
    if isinstance(exc, (FileNotFoundError, hub.RevisionNotFoundError, hub.EntryNotFoundError)):
        return LoraCacheError(ErrorCode.NOT_FOUND, f"{source.url}: the source has no such file "
                              f"({reason(exc)})")
    denied = (hub.GatedRepoError, obstore.exceptions.UnauthenticatedError,
              obstore.exceptions.PermissionDeniedError, PermissionError)
    if isinstance(exc, denied) or _status(exc) in (401, 403):
        return LoraCacheError(ErrorCode.SOURCE_DENIED,
                              f"{source.url}: the source refused the daemon ({reason(exc)}); "
                              "give the daemon credentials for it (see the README, Sources)")
    return LoraCacheError(ErrorCode.SOURCE_FAILED, f"fetching {source.url} failed: {reason(exc)}")


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]
