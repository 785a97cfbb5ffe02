"""Prefetch, in process: the reply comes at once, after the request is checked; the tiers are
warmed in the background, so the next acquire is a hit; what cannot be warmed is logged."""

from __future__ import annotations

import asyncio

import pytest

from loracache.shared.errors import BadRequest, ErrorCode
from loracache.shared.protocol import (MAX_PREFETCH, Acquire, Done, Prefetch, decode_request,
                                       encode_request)
from tests.daemon.service_node import Node, in_loop


async def wait_for_entries(node: Node, names: set[str]) -> None:
    for _ in range(200):
        if await node.names() == names:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{await node.names()} != {names}")


@in_loop
async def test_prefetch_answers_at_once_and_the_next_acquires_are_hits(make_node):
    node = make_node()
    paths = [node.lora("a"), node.lora("b", units=2)]
    assert await node.ask(Prefetch(paths=paths)) == Done()
    assert await node.names() == set()  # nothing loaded yet: the reply did not wait
    await wait_for_entries(node, {"a", "b"})
    session = await node.hello()
    for name in ("a", "b"):
        await node.release(await node.lease(name, session), session)
    stats = node.stats()
    assert (stats.loads, stats.hits, stats.misses, stats.leases) == (2, 2, 0, 0)


@in_loop
async def test_a_prefetch_is_checked_before_it_is_answered(make_node, tmp_path):
    node = make_node()
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"")
    good = node.lora("a")
    refusals = {
        ErrorCode.FORBIDDEN_PATH: Prefetch(paths=[good, str(outside)]),
        ErrorCode.NOT_FOUND: Prefetch(paths=[good, "missing.safetensors"]),
        ErrorCode.FORBIDDEN_SOURCE: Prefetch(paths=[good, "https://example.com/x.safetensors"]),
        ErrorCode.UNKNOWN_DEVICE: Prefetch(paths=[good], device="cuda:7"),
        ErrorCode.BAD_REQUEST: Prefetch(paths=[good], layout="nope"),
    }
    for code, request in refusals.items():
        assert (await node.refused(request)).code is code
    await asyncio.sleep(0.1)
    assert await node.names() == set()  # a refused prefetch warms nothing, not even `good`


@in_loop
async def test_a_lora_that_fails_to_load_is_logged_and_the_rest_are_warmed(make_node, caplog):
    node = make_node()
    broken = node.loras / "broken.safetensors"
    broken.write_bytes(b"\x08" + b"\x00" * 7 + b"not json")
    assert await node.ask(Prefetch(paths=[broken.name, node.lora("a")])) == Done()
    await wait_for_entries(node, {"a"})
    for _ in range(100):
        if "prefetch of broken.safetensors on cpu failed: [INVALID_LORA]" in caplog.text:
            break
        await asyncio.sleep(0.01)
    assert "prefetch of broken.safetensors on cpu failed: [INVALID_LORA]" in caplog.text
    session = await node.hello()
    assert (await node.refused(Acquire(path=broken.name), session)).code is \
        ErrorCode.INVALID_LORA


def test_a_prefetch_names_at_most_1024_loras():
    too_many = Prefetch(paths=["a.safetensors"] * (MAX_PREFETCH + 1))
    with pytest.raises(BadRequest) as error:
        decode_request(encode_request(1, "", too_many))
    assert error.value.code is ErrorCode.BAD_REQUEST and error.value.request_id == 1
    decode_request(encode_request(1, "", Prefetch(paths=["a.safetensors"] * MAX_PREFETCH)))
