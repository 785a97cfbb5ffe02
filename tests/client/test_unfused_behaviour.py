"""Unfused adapters beyond matching the oracle: leases that follow the LoRA weights, hotswap
under torch.compile, quantized bases, dtypes, how sources are named, no copy in the worker;
and the fusing API's no-op and minimal switches."""

from __future__ import annotations

import copy
import gc
import logging
import os
import signal
import threading
import time

import pytest
import torch

from loracache.client import (ErrorCode, LoraCacheError, load_and_fuse_lora, load_lora_weights,
                              set_and_fuse_adapters)
from loracache.client.adapters import FACTOR_NAMES
from loracache.client.weight_leases import RELEASER
from loracache.shared.canonical import canonical_tensors
from loracache.shared.dtypes import SAFETENSORS_NAMES
from loracache.shared.families import DOWN, UP
from examples.tiny_models import image, peft_layers, save, sd_lora_peft, tiny_sd_pipeline
from tests.client.test_fusing_behaviour import memory_grown, unet_lora
from tests.support import Daemon, wait_until
from tests.tiny import to_kohya

# PEFT warns on every second adapter in a model: that is the point of these tests.
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")


def lora_weights(pipe, adapter: str) -> list[torch.nn.Parameter]:
    return [getattr(module, factor)[adapter].weight for root in (pipe.unet, pipe.text_encoder)
            for module in root.modules() for factor in FACTOR_NAMES
            if isinstance(getattr(module, factor, None), torch.nn.ModuleDict)
            and adapter in getattr(module, factor)]


def unet_output(pipe) -> torch.Tensor:
    """The UNet's output on fixed inputs (the layers hotswap touches)."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator).to(pipe.unet.dtype)
    text = torch.randn(1, 8, 32, generator=generator).to(pipe.unet.dtype)
    with torch.no_grad():
        return pipe.unet(sample, 10, text).sample


def unet_only(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.startswith(("unet.", "lora_unet_"))}


# ------------------------------------------------------------------------------- leases


def leases_become(daemon, count: int) -> None:
    """Wait for the daemon's lease count: weights that go wake the releaser thread."""
    wait_until(lambda: daemon.stats().leases == count, timeout=10)


def test_leases_follow_the_lora_weights(daemon, lora_dir):
    pipe = tiny_sd_pipeline()
    a = save(sd_lora_peft(pipe, seed=1), lora_dir / "a.safetensors")
    b = save(sd_lora_peft(pipe, seed=2), lora_dir / "b.safetensors")
    with daemon.client() as client:
        load_lora_weights(pipe, a, "a", client=client)
        load_lora_weights(pipe, b, "b", client=client)
        assert daemon.stats().leases == 2
        for _ in range(3):  # diffusers' own refusal; "a"'s weights view b's entry too
            with pytest.raises(ValueError, match="already in use"):
                load_lora_weights(pipe, b, "a", client=client)
        assert daemon.stats().leases == 2  # each failed load gave its lease back at once
        pipe.delete_adapters("a")
        leases_become(daemon, 1)
        pipe.fuse_lora()  # merging reads the factors: the lease stays
        time.sleep(0.2)
        assert daemon.stats().leases == 1
        pipe.unload_lora_weights()
        leases_become(daemon, 0)
        load_lora_weights(pipe, a, "a", client=client)
        assert daemon.stats().leases == 1
        copy.deepcopy(pipe)  # nothing of loracache's on the pipeline stands in the way
        del pipe
        gc.collect()
        leases_become(daemon, 0)  # the pipeline went, and its LoRA weights with it
        assert RELEASER.held() == 0


def test_a_lease_goes_when_its_weights_are_copied_away(daemon, lora_dir):
    """pipe.to(dtype) gives the LoRA weights new storage but keeps them: the releaser's
    periodic look finds the lease unused."""
    pipe = tiny_sd_pipeline()
    path = save(sd_lora_peft(pipe), lora_dir / "a.safetensors")
    with daemon.client() as client:
        load_lora_weights(pipe, path, "a", client=client)
        pipe.to(dtype=torch.float64)
        leases_become(daemon, 0)


def test_modules_convert_by_swapping_tensors(daemon, lora_dir):
    """Nothing of loracache's is attached to the LoRA weights: torch.utils.swap_tensors, which
    conversions use with this flag (and PEFT's hotswap to a larger rank), refuses tensors that
    have weak references."""
    pipe = tiny_sd_pipeline()
    path = save(sd_lora_peft(pipe), lora_dir / "a.safetensors")
    with daemon.client() as client:
        load_lora_weights(pipe, path, "a", client=client)
        swapping = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            pipe.unet.to(torch.float64)
        finally:
            torch.__future__.set_swap_module_params_on_conversion(swapping)
        assert all(w.dtype == torch.float64 for w in lora_weights(pipe, "a")[:4])


def test_cycling_adapters_keeps_one_releaser_and_nothing_behind(daemon, lora_dir):
    pipe = tiny_sd_pipeline(smallest=True)
    path = save(unet_only(sd_lora_peft(pipe)), lora_dir / "a.safetensors")
    with daemon.client() as client:
        for cycle in range(20):
            load_lora_weights(pipe, path, f"a{cycle}", client=client)
            pipe.delete_adapters(f"a{cycle}")
        leases_become(daemon, 0)
    assert [t.name for t in threading.enumerate()].count("loracache-releaser") == 1
    assert RELEASER.held() == 0


def test_the_worker_keeps_no_copy_of_an_unfused_lora(daemon, lora_dir):
    """A float16 file (as LoRAs are mostly shipped) for a float32 pipeline: PEFT casts it, so
    each worker of diffusers' own holds a cast copy, where the daemon casts it once. (A file
    already in the model's dtype diffusers maps from the page cache on the CPU, shared; on a
    GPU each of its workers uploads a copy of its own either way.)"""
    pipe = tiny_sd_pipeline()
    path = save({k: v.half() for k, v in unet_lora(pipe, rank=2048, seed=3).items()},
                lora_dir / "big.safetensors")
    size = os.path.getsize(path)
    grown = {mode: memory_grown(daemon, path, mode) for mode in ("unfused", "diffusers")}
    print(f"anonymous memory grown by a {size >> 20} MiB unfused LoRA: loracache "
          f"{grown['unfused'] >> 20} MiB, diffusers' own {grown['diffusers'] >> 20} MiB")
    assert grown["unfused"] < 0.1 * size  # PEFT's layers use the daemon's copy
    assert grown["diffusers"] > 1.8 * size  # each worker's own float32 copy


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_daemon_casts_to_the_pipeline_dtype_so_nothing_is_copied(daemon, lora_dir, dtype):
    pipe = tiny_sd_pipeline(dtype=dtype)
    path = save(sd_lora_peft(tiny_sd_pipeline()), lora_dir / "f32.safetensors")  # float32
    with daemon.client() as client:
        load_lora_weights(pipe, path, "a", client=client)
        weights = lora_weights(pipe, "a")
        lease = client.acquire(path, layout=f"sd:{SAFETENSORS_NAMES[dtype]}")
        shared = lease.tensors[next(iter(lease.tensors))].untyped_storage().data_ptr()
        assert weights and all(w.dtype == dtype for w in weights)
        assert all(w.untyped_storage().data_ptr() == shared for w in weights)
        (entry,) = client.list()
        assert entry.layout == lease.entry.layout and entry.leases == 2
        lease.release()


# ------------------------------------------------------------------------------- hotswap


def test_hotswap_under_torch_compile_never_recompiles(daemon, lora_dir):
    """enable_lora_hotswap, then swaps between ranks 4 and 8 (kohya alphas) on a compiled UNet
    with recompilation an error; diffusers' own hotswap on an eager copy is the oracle. The
    backend is aot_eager: recompiles are dynamo's (the same for every backend), and inductor
    takes 40 s to compile even this UNet on 2 CPU cores (bench/unfused.py runs it)."""
    pipe = tiny_sd_pipeline(smallest=True)
    a = save(unet_only(sd_lora_peft(pipe, seed=1)), lora_dir / "a.safetensors")
    b = save(unet_only(to_kohya(sd_lora_peft(pipe, seed=5, rank=8), alpha=2.0)),
             lora_dir / "b.safetensors")
    reference = copy.deepcopy(pipe)
    for target in (pipe, reference):
        target.enable_lora_hotswap(target_rank=16)
    torch._dynamo.reset()
    with daemon.client() as client:
        load_lora_weights(pipe, a, "x", client=client)
        reference.load_lora_weights(str(a), adapter_name="x")
        pipe.unet = torch.compile(pipe.unet, backend="aot_eager")
        first = unet_output(pipe)
        assert torch.equal(first, unet_output(reference))
        assert daemon.stats().leases == 0  # padded to rank 16: the layers hold their own slot
        with torch._dynamo.config.patch(error_on_recompile=True):
            load_lora_weights(pipe, b, "x", client=client, hotswap=True)
            reference.load_lora_weights(str(b), adapter_name="x", hotswap=True)
            assert torch.equal(unet_output(pipe), unet_output(reference))
            assert not torch.equal(unet_output(pipe), first)
            load_lora_weights(pipe, a, "x", client=client, hotswap=True)
            assert torch.equal(unet_output(pipe), first)
        assert daemon.stats().leases == 0
    torch._dynamo.reset()


def test_hotswap_of_a_shared_adapter_never_writes_into_the_shared_copy(daemon, lora_dir):
    """Without enable_lora_hotswap the first adapter's layers are views of the daemon's copy
    (read-only on the CPU: a write would fault). The swap must copy into the worker's own."""
    pipe = tiny_sd_pipeline()
    a = save(unet_only(sd_lora_peft(pipe, seed=1)), lora_dir / "a.safetensors")
    b = save(unet_only(sd_lora_peft(pipe, seed=2)), lora_dir / "b.safetensors")
    reference = copy.deepcopy(pipe)
    with daemon.client() as client:
        load_lora_weights(pipe, a, "x", client=client)
        assert daemon.stats().leases == 1
        load_lora_weights(pipe, b, "x", client=client, hotswap=True)
        reference.load_lora_weights(str(b), adapter_name="x")
        assert torch.equal(unet_output(pipe), unet_output(reference))
        leases_become(daemon, 0)  # the slot is the worker's own now
        with client.acquire(a, layout="sd:F32") as lease:  # the node's copy of a is intact
            expected = canonical_tensors(sd_lora_peft(tiny_sd_pipeline(), seed=1), "sd")
            assert all(torch.equal(lease.tensors[k], v) for k, v in expected.items()
                       if k.startswith("unet.") and k.endswith((DOWN, UP)))


def shared_copy_intact(client, path, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether the node's copy of ``path`` still holds the factors of ``tensors``."""
    expected = canonical_tensors(tensors, "sd")
    with client.acquire(path, layout="sd:F32") as lease:
        return all(torch.equal(lease.tensors[k], v) for k, v in expected.items()
                   if k.endswith((DOWN, UP)))


def test_hotswap_to_a_larger_rank_leaves_other_leases_views_alone(daemon, lora_dir):
    """Without enable_lora_hotswap PEFT swaps a weight's contents with the tensor it is given
    for a larger rank: that must not be a view another lease of this process hands out."""
    pipe = tiny_sd_pipeline()
    b_tensors = unet_only(sd_lora_peft(pipe, seed=2, rank=8))
    a = save(unet_only(sd_lora_peft(pipe, seed=1, rank=4)), lora_dir / "a.safetensors")
    b = save(b_tensors, lora_dir / "b.safetensors")
    reference = copy.deepcopy(pipe)
    with daemon.client() as client:
        other = client.acquire(b, layout="sd:F32")  # another pipeline of this worker uses b
        load_lora_weights(pipe, a, "x", client=client)
        load_lora_weights(pipe, b, "x", client=client, hotswap=True)
        expected = canonical_tensors(b_tensors, "sd")
        assert all(torch.equal(other.tensors[k], v) for k, v in expected.items()
                   if k.endswith((DOWN, UP)))
        other.release()
        load_lora_weights(pipe, a, "x", client=client, hotswap=True)  # no write into b's copy
        reference.load_lora_weights(str(a), adapter_name="x")
        assert torch.equal(unet_output(pipe), unet_output(reference))
        assert shared_copy_intact(client, b, b_tensors)


def test_hotswap_is_safe_through_another_pipeline_and_after_a_failed_load(daemon, lora_dir):
    """The views are found from the weights themselves, whichever pipeline loaded them and
    however that load ended."""
    from diffusers import StableDiffusionImg2ImgPipeline

    txt2img = tiny_sd_pipeline()
    img2img = StableDiffusionImg2ImgPipeline(**txt2img.components)  # what from_pipe does
    full = sd_lora_peft(txt2img, seed=1)
    text_only = save({k: v for k, v in full.items() if k.startswith("text_encoder.")},
                     lora_dir / "te.safetensors")
    both = save(full, lora_dir / "both.safetensors")
    b_tensors = unet_only(sd_lora_peft(txt2img, seed=2))
    b = save(b_tensors, lora_dir / "b.safetensors")
    with daemon.client() as client:
        load_lora_weights(txt2img, text_only, "x", client=client)
        with pytest.raises(ValueError, match="already exists"):  # the UNet took it first
            load_lora_weights(txt2img, both, "x", client=client)
        assert daemon.stats().leases == 2  # the UNet's views of "both" hold its lease
        load_lora_weights(img2img, b, "x", client=client, hotswap=True)
        leases_become(daemon, 1)  # the UNet's weights are its own now: only te's is held
        assert shared_copy_intact(client, both, full)


def test_hotswap_after_a_daemon_restart_and_after_the_client_closed(start_daemon, lora_dir):
    first = start_daemon("--max-bytes", "1GiB", "--session-ttl", "30")
    pipe = tiny_sd_pipeline()
    a_tensors = unet_only(sd_lora_peft(pipe, seed=1))
    a = save(a_tensors, lora_dir / "a.safetensors")
    b = save(unet_only(sd_lora_peft(pipe, seed=2)), lora_dir / "b.safetensors")
    client = first.client()
    load_lora_weights(pipe, a, "x", client=client)
    first.stop(signal.SIGKILL)
    second = Daemon(lora_dir, "--max-bytes", "1GiB", reuse=first)
    try:
        client.verify_session()  # leases a again from the new daemon
        RELEASER.look(follow_renewals=True)  # as the next load does: the weights follow
        (entry,) = client.list()
        assert entry.leases == 1  # one copy on the node, the weights' own
        (lease,) = [held.lease for held in RELEASER._held if held.lease.entry.id == entry.id]
        storage = lease.tensors[next(iter(lease.tensors))].untyped_storage().data_ptr()
        assert all(w.untyped_storage().data_ptr() == storage for w in lora_weights(pipe, "x"))
        load_lora_weights(pipe, b, "x", client=client, hotswap=True)
        assert shared_copy_intact(client, a, a_tensors)
        load_lora_weights(pipe, a, "y", client=client)
        client.close()  # the views stay mapped; a hotswap still copies them first
        with second.client() as other:
            load_lora_weights(pipe, b, "y", client=other, hotswap=True)
            assert shared_copy_intact(other, a, a_tensors)
    finally:
        second.cleanup()


def test_text_encoders_cannot_be_hotswapped_and_nothing_is_swapped(daemon, lora_dir):
    pipe = tiny_sd_pipeline()
    a = save(sd_lora_peft(pipe, seed=1), lora_dir / "a.safetensors")
    with daemon.client() as client:
        load_lora_weights(pipe, a, "x", client=client)
        before = unet_output(pipe)
        with pytest.raises(ValueError, match="not supported for text encoders"):
            load_lora_weights(pipe, save(sd_lora_peft(pipe, seed=4), lora_dir / "b.safetensors"),
                              "x", client=client, hotswap=True)
        assert torch.equal(unet_output(pipe), before)


# ----------------------------------------------------------------------- quantized bases


@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated:UserWarning")
def test_quantized_base_takes_unfused_adapters_and_refuses_fusing(daemon, lora_dir):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    pipe = tiny_sd_pipeline()
    path = save(sd_lora_peft(pipe), lora_dir / "a.safetensors")
    quantize_(pipe.unet, Int8WeightOnlyConfig())
    reference, bare = copy.deepcopy(pipe), copy.deepcopy(pipe)
    with daemon.client() as client:
        load_lora_weights(pipe, path, "a", client=client)
        reference.load_lora_weights(str(path), adapter_name="a")
        assert torch.equal(image(pipe), image(reference))
        assert not torch.equal(image(pipe), image(bare))
        pipe.set_adapters("a", 0.4)
        reference.set_adapters("a", 0.4)
        assert torch.equal(image(pipe), image(reference))
        with pytest.raises(ValueError, match=r"quantized .*load_lora_weights"):
            load_and_fuse_lora(bare, path, "a", client=client)
        assert daemon.stats().leases == 1  # pipe's; the refused fuse gave its lease back


def test_float8_and_packed_weights_are_refused_by_fusing(daemon, lora_dir):
    """diffusers' layerwise casting stores float8; bitsandbytes 4-bit and GGUF store packed
    bytes of another shape, which would otherwise read as "no module of that shape"."""
    pipe = tiny_sd_pipeline()
    path = save(unet_only(sd_lora_peft(pipe)), lora_dir / "a.safetensors")
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    original = layer.weight
    for stored in (original.detach().to(torch.float8_e4m3fn),
                   torch.zeros(original.numel() // 2, 1, dtype=torch.uint8)):  # 4-bit, packed
        layer.weight = torch.nn.Parameter(stored, requires_grad=False)
        with daemon.client() as client:
            with pytest.raises(ValueError, match="quantized"):
                load_and_fuse_lora(pipe, path, "a", client=client, strict=False)
            assert daemon.stats().leases == 0


@pytest.mark.parametrize("case", ["text encoder in float32", "float8 storage"])
def test_mixed_dtypes_load_like_diffusers(daemon, lora_dir, case):
    """Components in different dtypes get the factors uncast (PEFT casts per layer, as for
    diffusers); diffusers' layerwise casting (float8 storage) is not a dtype to cast to."""
    pipe = tiny_sd_pipeline()
    path = save(sd_lora_peft(tiny_sd_pipeline()), lora_dir / "a.safetensors")
    if case == "text encoder in float32":
        pipe.unet.to(torch.bfloat16)
    reference = copy.deepcopy(pipe)
    if case == "float8 storage":
        for target in (pipe, reference):
            target.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                                 compute_dtype=torch.float32)
    with daemon.client() as client:
        load_lora_weights(pipe, path, "a", client=client)
        reference.load_lora_weights(str(path), adapter_name="a")
        ids = torch.arange(8).unsqueeze(0)
        with torch.no_grad():
            assert torch.equal(pipe.text_encoder(ids)[0], reference.text_encoder(ids)[0])
        if case == "float8 storage":  # PEFT stores the UNet's factors as float8 too, and its
            # layers then cannot run on the CPU (diffusers' own the same): compare the factors
            assert all(ours.dtype == theirs.dtype and torch.equal(ours, theirs) for ours, theirs
                       in zip(lora_weights(pipe, "a"), lora_weights(reference, "a")))
        else:
            assert torch.equal(unet_output(pipe), unet_output(reference))


# ------------------------------------------------------------------------ naming sources


def test_sources_are_named_as_diffusers_names_them(daemon, lora_dir):
    pipe = tiny_sd_pipeline()
    save(sd_lora_peft(pipe), lora_dir / "sub" / "a.safetensors")
    with daemon.client() as client:
        load_lora_weights(pipe, lora_dir, "a", client=client, subfolder="sub",
                          weight_name="a.safetensors")
        assert pipe.get_list_adapters() == {"unet": ["a"], "text_encoder": ["a"]}
        with pytest.raises(LoraCacheError) as error:  # a Hub repository: the daemon fetches
            load_lora_weights(pipe, "org/styles", "b", client=client, revision="v2",
                              subfolder="sub", weight_name="b.safetensors")
        assert error.value.code is ErrorCode.FORBIDDEN_SOURCE
        assert "hf://org/styles@v2/sub/b.safetensors" in error.value.message
        with pytest.raises(ValueError, match="weight_name"):
            load_lora_weights(pipe, "org/styles", "b", client=client, revision="v2")
        with pytest.raises(TypeError, match="cache_dir"):
            load_lora_weights(pipe, lora_dir, "b", client=client, cache_dir="/tmp")
        with pytest.raises(ValueError, match="low_cpu_mem_usage"):
            load_lora_weights(pipe, lora_dir, "b", client=client, low_cpu_mem_usage=False)
        assert daemon.stats().leases == 1


def test_without_a_daemon_it_loads_locally(tmp_path, lora_dir, monkeypatch, caplog):
    from loracache.client import sourcing

    monkeypatch.setenv("LORACACHE_SOCKET", str(tmp_path / "nobody.sock"))
    sourcing.clear_lora_cache()
    monkeypatch.setattr(sourcing, "_warned_fallback", False)
    pipe = tiny_sd_pipeline()
    reference = copy.deepcopy(pipe)
    path = save(sd_lora_peft(pipe), lora_dir / "a.safetensors")
    with caplog.at_level(logging.WARNING, logger="loracache.client"):
        load_lora_weights(pipe, path, "a")
    assert any("without sharing" in r.message for r in caplog.records)
    reference.load_lora_weights(str(path), adapter_name="a")
    assert torch.equal(image(pipe), image(reference))
    with pytest.raises(LoraCacheError):
        load_lora_weights(pipe, path, "b", fallback="error")
    sourcing.clear_lora_cache()


# ----------------------------------------------------------- the fusing API: no waste


def test_fusing_only_rewrites_the_weights_that_change(daemon, lora_dir):
    """Weights are rewritten in place, so their version counters tell which were touched."""
    pipe = tiny_sd_pipeline()
    paths = {name: save({f"unet.{k}": v for k, v in
                         peft_layers(pipe.unet, [target], rank=4, seed=seed).items()},
                        lora_dir / f"{name}.safetensors")
             for seed, (name, target) in enumerate(
                 [("out", "to_out.0"), ("q", "to_q"), ("k", "to_k")])}
    versions = {}

    def rewritten(suffix: str) -> bool:
        changed = [name for name, p in pipe.unet.named_parameters()
                   if name.endswith(suffix) and p._version != versions[name]]
        return bool(changed)

    with daemon.client() as client:
        for name, path in paths.items():
            load_and_fuse_lora(pipe, path, name, client=client)
        set_and_fuse_adapters(pipe, ["out", "q"])
        versions.update({name: p._version for name, p in pipe.unet.named_parameters()})
        set_and_fuse_adapters(pipe, ["out", "q"], [1.0, 1.0])  # already fused: nothing
        assert not any(rewritten(s) for s in ("to_out.0.weight", "to_q.weight", "to_k.weight"))
        set_and_fuse_adapters(pipe, ["out", "k"])
        assert not rewritten("to_out.0.weight")  # the same term before and after
        assert rewritten("to_q.weight") and rewritten("to_k.weight")
