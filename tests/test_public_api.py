"""Pins the public API: what workers import must not change by accident."""

import inspect

import loracache.client as client
from loracache.shared.errors import ErrorCode


def test_client_exports():
    assert sorted(client.__all__) == [
        "ErrorCode", "Lease", "LoraCacheClient", "LoraCacheError", "clear_lora_cache",
        "delete_adapters", "get_active_adapters", "load_and_fuse_lora", "load_lora_weights",
        "set_and_fuse_adapters", "unfuse_lora"]


def test_unfused_signature_matches_diffusers():
    assert str(inspect.signature(client.load_lora_weights)) == (
        "(pipeline: 'Any', source: 'str | os.PathLike[str] | Mapping[str, torch.Tensor]', "
        "adapter_name: 'str | None' = None, *, client: 'LoraCacheClient | None' = None, "
        "hotswap: 'bool' = False, fallback: 'str' = 'local', **kwargs: 'Any') -> 'None'")


def test_fusing_signatures_match_onediffx():
    assert str(inspect.signature(client.load_and_fuse_lora)).startswith(
        "(pipeline: 'Any', source: 'str | os.PathLike[str] | Mapping[str, torch.Tensor]', "
        "adapter_name: 'str | None' = None, *, lora_scale: 'float' = 1.0, "
        "memory_efficient: 'bool' = True, client: 'LoraCacheClient | None' = None, "
        "strict: 'bool' = True, restore: 'str' = 'subtract', fallback: 'str' = 'local')")
    for name in ("unfuse_lora", "get_active_adapters"):
        assert list(inspect.signature(getattr(client, name)).parameters) == ["pipeline"]
    assert list(inspect.signature(client.set_and_fuse_adapters).parameters) == [
        "pipeline", "adapter_names", "adapter_weights"]
    assert list(inspect.signature(client.delete_adapters).parameters) == [
        "pipeline", "adapter_names"]


def test_client_signatures():
    c = client.LoraCacheClient
    assert str(inspect.signature(c.acquire)) == (
        "(self, path: 'str | os.PathLike[str]', device: 'str | torch.device' = 'cpu', "
        "layout: 'str' = 'raw') -> 'Lease'")
    for method in ("stats", "list", "preload", "evict", "clear", "close"):
        assert callable(getattr(c, method))
    assert callable(client.Lease.release) and isinstance(client.Lease.released, property)
    assert list(inspect.signature(client.Lease).parameters)[:3] == ["lease_id", "entry", "tensors"]


def test_error_codes_are_a_closed_set():
    assert {code.value for code in ErrorCode} >= {
        "BAD_REQUEST", "VERSION_MISMATCH", "FORBIDDEN_PATH", "NOT_FOUND", "INVALID_LORA",
        "UNSUPPORTED_FORMAT", "TOO_LARGE", "CACHE_FULL", "UNKNOWN_DEVICE", "UNKNOWN_LEASE",
        "UNKNOWN_SESSION", "INTERNAL"}
