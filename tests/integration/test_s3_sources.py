"""LoRAs from S3: a real S3 server (moto's, in the test process, checking every request's
signature against the access keys of its IAM) reached by the real daemon through obstore's S3
client, configured as an operator would: the AWS variables in the daemon's environment, or a
``[source."s3://bucket"]`` table in its configuration file."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import boto3
import pytest
import requests
import torch
from moto.server import ThreadedMotoServer
from safetensors.torch import load, save

from loracache.client import ErrorCode, LoraCacheError
from tests.support import Daemon, wait_until

BUCKET = "loras"
OTHER_BUCKET = "elsewhere"
PUBLIC_BUCKET = "public-loras"
REGION = "us-west-2"  # not moto's default: the tests see it reach the server in the signature


class Request:
    def __init__(self, method: str, path: str, authorization: str) -> None:
        self.method = method
        self.path = path
        # AWS4-HMAC-SHA256 Credential=KEY/DATE/REGION/s3/aws4_request, ...
        match = re.search(r"Credential=([^/]*)/[^/]*/([^/]*)/", authorization)
        self.key_id, self.region = match.groups() if match else (None, None)


class S3:
    """A moto server with IAM authentication on: only requests signed with the secret of a
    known access key get in. ``key_id`` and ``secret`` are those of an IAM user allowed
    everything in S3, ``profile_key_id`` and ``profile_secret`` those of a second one."""

    def __init__(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.endpoint = "http://127.0.0.1:{}".format(self.server.get_host_and_port()[1])
        self.requests: list[Request] = []
        wsgi = self.server._server.app  # type: ignore[union-attr]

        def logged(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if not environ["PATH_INFO"].startswith("/moto-api/"):
                self.requests.append(Request(environ["REQUEST_METHOD"], environ["PATH_INFO"],
                                             environ.get("HTTP_AUTHORIZATION", "")))
            return wsgi(environ, start_response)

        self.server._server.app = logged  # type: ignore[union-attr]
        # Set up while moto lets everything in, then turn its signature checks on.
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        keys = []
        for user in ("loracache", "profiled"):
            iam.create_user(UserName=user)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys.append((key["AccessKeyId"], key["SecretAccessKey"]))
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        (self.key_id, self.secret), (self.profile_key_id, self.profile_secret) = keys
        self._auth(0)
        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                                   aws_access_key_id=self.key_id,
                                   aws_secret_access_key=self.secret)
        for bucket in (BUCKET, OTHER_BUCKET, PUBLIC_BUCKET):
            self.client.create_bucket(Bucket=bucket, CreateBucketConfiguration={
                "LocationConstraint": REGION})

    def _auth(self, unchecked: float) -> None:
        """Let ``unchecked`` more requests in unsigned (inf: all), as moto's own tests do."""
        response = requests.post(f"{self.endpoint}/moto-api/reset-auth",
                                 data=str(unchecked).encode(), timeout=10)
        response.raise_for_status()

    @contextlib.contextmanager
    def unchecked(self) -> Iterator[None]:
        """Signatures unchecked meanwhile: moto answers an unsigned request with a 500 while
        it checks them, even for a public object."""
        self._auth(float("inf"))
        try:
            yield
        finally:
            self._auth(0)

    def put(self, key: str, data: bytes, bucket: str = BUCKET, **args: str) -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=data, **args)

    def calls(self, method: str, key: str, bucket: str = BUCKET) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == f"/{bucket}/{key}"]

    def env(self, **changes: str) -> dict[str, str]:
        """The daemon's environment: the standard AWS variables, as an operator sets them."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_REGION": REGION,
                "AWS_ALLOW_HTTP": "true", **changes}

    def close(self) -> None:
        self._auth(float("inf"))  # moto's settings are the whole process's
        self.server.stop()


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    server = S3()
    yield server
    server.close()


@pytest.fixture
def s3_daemon(start_daemon, s3, cache_dir):
    """A daemon allowed ``s3://loras/team/`` only, reaching moto by the AWS variables."""
    def start(*flags: str, **env: str) -> Daemon:
        return start_daemon("--allow-source", f"s3://{BUCKET}/team/", "--cache-dir",
                            str(cache_dir), *flags, env=s3.env(**env))
    return start


def lora_bytes(seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    return save({"w.lora_down.weight": torch.randn(8, 64, generator=generator),
                 "w.lora_up.weight": torch.randn(64, 8, generator=generator)})


def downloads(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.safetensors"))


def same_tensors(got: dict[str, torch.Tensor], data: bytes) -> bool:
    expected = load(data)
    return got.keys() == expected.keys() and all(
        got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in expected.items())


def test_an_object_is_downloaded_once_however_many_ask(s3_daemon, s3, cache_dir):
    data = lora_bytes(1)
    s3.put("team/a.safetensors", data)
    daemon = s3_daemon()
    with daemon.client() as client, concurrent.futures.ThreadPoolExecutor(4) as pool:
        leases = list(pool.map(lambda _: client.acquire(f"s3://{BUCKET}/team/a.safetensors"),
                               range(4)))
        for lease in leases:
            assert same_tensors(lease.tensors, data)
            lease.release()
        client.acquire(f"s3://{BUCKET}/team/a.safetensors").release()  # a hit
    gets = s3.calls("GET", "team/a.safetensors")
    assert len(gets) == 1
    # signed with the daemon's credentials and region (moto checked the signature)
    assert (gets[0].key_id, gets[0].region) == (s3.key_id, REGION)
    assert [p.read_bytes() for p in downloads(cache_dir)] == [data]
    assert daemon.cpu_stats().loads == 1


def test_a_missing_key_is_not_found_and_other_buckets_are_never_asked(s3_daemon, s3,
                                                                       cache_dir):
    s3.put("elsewhere/a.safetensors", lora_bytes(2))
    s3.put("team/a.safetensors", lora_bytes(2), bucket=OTHER_BUCKET)
    daemon = s3_daemon()
    with daemon.client() as client:
        with pytest.raises(LoraCacheError) as error:
            client.acquire(f"s3://{BUCKET}/team/missing.safetensors")
        assert error.value.code is ErrorCode.NOT_FOUND, error.value
        assert "team/missing.safetensors" in error.value.message
        assert s3.calls("GET", "team/missing.safetensors")  # it was asked
        asked = len(s3.requests)
        for url in (f"s3://{BUCKET}/elsewhere/a.safetensors",  # both are there to fetch
                    f"s3://{OTHER_BUCKET}/team/a.safetensors"):
            with pytest.raises(LoraCacheError) as error:
                client.acquire(url)
            assert error.value.code is ErrorCode.FORBIDDEN_SOURCE, url
            assert "allow_sources" in error.value.message
        assert len(s3.requests) == asked
    assert downloads(cache_dir) == [] and list((cache_dir / ".partial").iterdir()) == []


@pytest.mark.parametrize("credentials", ["wrong secret", "unknown key"])
def test_wrong_credentials_are_source_denied(s3_daemon, s3, cache_dir, credentials):
    s3.put("team/denied.safetensors", lora_bytes(3))
    env = ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"} if credentials == "wrong secret"
           else {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWNUNKNOWN00"})
    daemon = s3_daemon(**env)
    with daemon.client() as client:
        with pytest.raises(LoraCacheError) as error:
            client.acquire(f"s3://{BUCKET}/team/denied.safetensors")
        assert error.value.code is ErrorCode.SOURCE_DENIED, error.value
        assert f"s3://{BUCKET}/team/denied.safetensors" in error.value.message
    assert s3.calls("GET", "team/denied.safetensors")  # moto refused it, not the daemon
    assert downloads(cache_dir) == [] and list((cache_dir / ".partial").iterdir()) == []


def test_a_changed_object_is_a_new_entry_once_revalidated(s3_daemon, s3, cache_dir):
    old_data, new_data = lora_bytes(4), lora_bytes(5)
    s3.put("team/changing.safetensors", old_data)
    url = f"s3://{BUCKET}/team/changing.safetensors"
    daemon = s3_daemon("--source-revalidate-s", "0")
    with daemon.client() as client:
        old = client.acquire(url)
        before = {k: v.clone() for k, v in old.tensors.items()}
        s3.put("team/changing.safetensors", new_data)  # a new ETag
        with client.acquire(url) as stale:  # served at once; the source is asked meanwhile
            assert stale.entry.id == old.entry.id
        wait_until(lambda: [p.read_bytes() for p in downloads(cache_dir)] == [new_data])
        with client.acquire(url) as new:
            assert new.entry.id != old.entry.id
            assert same_tensors(new.tensors, new_data)
        assert same_tensors(old.tensors, old_data)  # the old lease keeps its tensors
        assert all(torch.equal(old.tensors[k], v) for k, v in before.items())
        old.release()
    assert len(s3.calls("GET", "team/changing.safetensors")) == 2


def test_a_restarted_daemon_serves_its_downloads_without_fetching_again(s3_daemon, s3,
                                                                         cache_dir):
    data = lora_bytes(6)
    s3.put("team/kept.safetensors", data)
    url = f"s3://{BUCKET}/team/kept.safetensors"
    first = s3_daemon()
    with first.client() as client:
        client.acquire(url).release()
    assert first.stop() == 0
    heads = len(s3.calls("HEAD", "team/kept.safetensors"))
    second = s3_daemon()
    with second.client() as client, client.acquire(url) as lease:
        assert same_tensors(lease.tensors, data)
        # served from disk at once, and the source asked in the background whether it changed
        wait_until(lambda: len(s3.calls("HEAD", "team/kept.safetensors")) == heads + 1)
    assert len(s3.calls("GET", "team/kept.safetensors")) == 1
    assert second.cpu_stats().loads == 1


def test_buckets_configured_in_the_config_file(start_daemon, s3, tmp_path, cache_dir,
                                              lora_dir):
    """``[source."s3://bucket"]`` tables: an endpoint and region each, credentials from the
    AWS variables or from an AWS profile. The environment's AWS_ENDPOINT_URL (a closed port) and
    AWS_REGION are for other buckets."""
    data = lora_bytes(7)
    s3.put("team/configured.safetensors", data)
    s3.put("team/configured.safetensors", data, bucket=OTHER_BUCKET)
    aws = tmp_path / "aws"
    aws.mkdir()
    (aws / "credentials").write_text(f"[lora]\naws_access_key_id = {s3.profile_key_id}\n"
                                     f"aws_secret_access_key = {s3.profile_secret}\n")
    (aws / "config").write_text("[profile lora]\nregion = us-east-1\n")
    config = tmp_path / "config.toml"
    config.write_text(f"""\
lora_dirs = [{json.dumps(str(lora_dir))}]
allow_sources = ["s3://{BUCKET}/team/", "s3://{OTHER_BUCKET}/team/"]
cache_dir = {json.dumps(str(cache_dir))}

[source."s3://{BUCKET}"]
endpoint = "{s3.endpoint}"
region = "eu-central-1"

[source."s3://{OTHER_BUCKET}"]
endpoint = "{s3.endpoint}"
region = "eu-west-3"
profile = "lora"
""")
    daemon = start_daemon(config=config, env={
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_REGION": "ap-south-1",
        "AWS_ACCESS_KEY_ID": s3.key_id, "AWS_SECRET_ACCESS_KEY": s3.secret,
        "AWS_SHARED_CREDENTIALS_FILE": str(aws / "credentials"),
        "AWS_CONFIG_FILE": str(aws / "config")})
    with daemon.client() as client:
        for bucket in (BUCKET, OTHER_BUCKET):
            with client.acquire(f"s3://{bucket}/team/configured.safetensors") as lease:
                assert same_tensors(lease.tensors, data)
    [get] = s3.calls("GET", "team/configured.safetensors")
    assert (get.key_id, get.region) == (s3.key_id, "eu-central-1")
    [get] = s3.calls("GET", "team/configured.safetensors", bucket=OTHER_BUCKET)
    assert (get.key_id, get.region) == (s3.profile_key_id, "eu-west-3")


def test_a_public_bucket_is_asked_without_signing(start_daemon, s3, tmp_path, cache_dir,
                                                  lora_dir):
    """``skip_signature = true``: no credentials are needed, and none are sent."""
    data = lora_bytes(8)
    s3.put("a.safetensors", data, bucket=PUBLIC_BUCKET, ACL="public-read")
    config = tmp_path / "config.toml"
    config.write_text(f"""\
lora_dirs = [{json.dumps(str(lora_dir))}]
allow_sources = ["s3://{PUBLIC_BUCKET}/"]
cache_dir = {json.dumps(str(cache_dir))}

[source."s3://{PUBLIC_BUCKET}"]
endpoint = "{s3.endpoint}"
skip_signature = true
""")
    daemon = start_daemon(config=config, env=s3.env())  # credentials it must not use
    with s3.unchecked(), daemon.client() as client, \
            client.acquire(f"s3://{PUBLIC_BUCKET}/a.safetensors") as lease:
        assert same_tensors(lease.tensors, data)
    [get] = s3.calls("GET", "a.safetensors", bucket=PUBLIC_BUCKET)
    assert get.key_id is None  # no Authorization header
