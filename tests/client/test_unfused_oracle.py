"""Unfused adapters loaded through loracache equal diffusers' own ``load_lora_weights`` with the
same files (the oracle), for SD 1.x, SDXL, Flux and SD3 tiny pipelines: images and the outputs
of the denoiser and of every LoRA layer, bit for bit, for single adapters, weighted mixes,
``disable_lora``/``enable_lora``, deletion and hotswaps; and the worker's LoRA weights are views
of the lease (one entry per file, however many pipelines and adapters use it)."""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import gc
import warnings
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from peft import LoraConfig

from loracache.client import load_lora_weights
from loracache.shared.families import DOWN
from examples.tiny_models import image, save, sd_lora_peft, tiny_sd_pipeline
from tests.support import Daemon, wait_until
from tests.tiny import to_kohya, to_legacy_diffusers
from tests.tiny_families import (flux_image, flux_lora_kohya, flux_lora_peft, kohya_with_alphas,
                                 sd3_image, sd3_lora_peft, sdxl_image, sdxl_lora_peft,
                                 sdxl_to_kohya, tiny_flux_pipeline, tiny_sd3_pipeline,
                                 tiny_sdxl_pipeline)

Maker = Callable[..., dict[str, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class FamilyCase:
    build: Callable
    image: Callable
    denoiser: str
    text_encoders: tuple[str, ...]  # those the family's LoRAs may touch
    peft: Maker  # (pipe, rank=, seed=) -> a LoRA in diffusers' PEFT keys
    other: Maker  # (pipe, seed=) -> one of another rank (kohya, with alphas, where it can)

    @property
    def components(self) -> tuple[str, ...]:
        return (self.denoiser, *self.text_encoders)


FAMILIES = {
    "sd": FamilyCase(tiny_sd_pipeline, image, "unet", ("text_encoder",), sd_lora_peft,
                     lambda pipe, seed: to_kohya(sd_lora_peft(pipe, rank=8, seed=seed), 2.0)),
    "sdxl": FamilyCase(tiny_sdxl_pipeline, sdxl_image, "unet", ("text_encoder", "text_encoder_2"),
                       sdxl_lora_peft, lambda pipe, seed: sdxl_to_kohya(
                           sdxl_lora_peft(pipe, rank=8, seed=seed), 2.0)),
    "flux": FamilyCase(tiny_flux_pipeline, flux_image, "transformer", ("text_encoder",),
                       flux_lora_peft, lambda pipe, seed: flux_lora_kohya(seed=seed)),
    "sd3": FamilyCase(tiny_sd3_pipeline, sd3_image, "transformer",
                      ("text_encoder", "text_encoder_2"), sd3_lora_peft,
                      lambda pipe, seed: sd3_lora_peft(pipe, rank=8, seed=seed)),
}
DENOISERS = ("sd", "flux")  # a UNet and a transformer, for what does not depend on the family
LAYOUT = "{}:F32"  # the family's canonical layout, cast to the pipelines' float32


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny models compute faster on one thread than on two that wait for each other (the
    more so while the suite's two workers and their daemons share two cores); both pipelines
    of a comparison run alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipelines() -> dict:
    """One tiny pipeline per family, built once; tests work on deep copies."""
    return {name: case.build() for name, case in FAMILIES.items()}


@pytest.fixture(scope="module")
def base_images(pipelines) -> dict:
    return {name: FAMILIES[name].image(pipelines[name]) for name in FAMILIES}


@pytest.fixture(scope="module")
def two_loras(pipelines) -> Callable[[str], tuple[dict, dict]]:
    """Per family, made once: a rank-4 LoRA in PEFT keys, and one of another rank and format
    (with alphas where the family has such files)."""
    @functools.cache
    def make(family: str) -> tuple[dict, dict]:
        case, pipe = FAMILIES[family], pipelines[family]
        return case.peft(pipe, rank=4, seed=1), case.other(pipe, seed=5)
    return make


# ------------------------------------------------------------------------------ helpers


def lora_modules(pipe, case: FamilyCase) -> Iterator[tuple[str, torch.nn.Module]]:
    """The PEFT LoRA layers (modules with ``lora_A``/``lora_B`` ModuleDicts) of every
    component, by ``<component>.<module>``."""
    for component in case.components:
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict):
                yield f"{component}.{name}", module


def lora_weights(pipe, case: FamilyCase, adapter: str) -> list[torch.Tensor]:
    return [getattr(module, factor)[adapter].weight for _, module in lora_modules(pipe, case)
            for factor in ("lora_A", "lora_B") if adapter in getattr(module, factor)]


def scalings(pipe, case: FamilyCase, adapter: str) -> dict[str, float]:
    """Each LoRA layer's scale for ``adapter`` (alpha / rank, times the adapter's weight)."""
    return {name: float(module.scaling[adapter]) for name, module in lora_modules(pipe, case)
            if adapter in module.scaling}


def traced(pipe, case: FamilyCase) -> dict[str, list[torch.Tensor]]:
    """One image, and every output of the denoiser and of each LoRA layer while making it."""
    outputs: dict[str, list[torch.Tensor]] = collections.defaultdict(list)

    def record(name: str):
        def hook(module, args, output):
            tensor = output if isinstance(output, torch.Tensor) else output[0]
            outputs[name].append(tensor.detach().clone())
        return hook

    watched = [(case.denoiser, getattr(pipe, case.denoiser)), *lora_modules(pipe, case)]
    hooks = [module.register_forward_hook(record(name)) for name, module in watched]
    try:
        outputs["image"].append(case.image(pipe))
    finally:
        for hook in hooks:
            hook.remove()
    return dict(outputs)


def assert_same_outputs(ours: dict[str, list[torch.Tensor]],
                        reference: dict[str, list[torch.Tensor]]) -> None:
    """Bit for bit: the same factors (the daemon converts with diffusers' own readers and casts
    float32 to float32) and the same scalings, computed by the same PEFT layers."""
    assert ours.keys() == reference.keys()
    for name, expected in reference.items():
        assert len(ours[name]) == len(expected), name
        for call, (mine, theirs) in enumerate(zip(ours[name], expected)):
            assert torch.equal(mine, theirs), (
                f"{name} call {call}: max difference {float((mine - theirs).abs().max())}")


def layers_of(outputs: dict[str, list[torch.Tensor]], component: str) -> int:
    return sum(name.startswith(f"{component}.") for name in outputs)


def loaded(reference, path: Path, name: str, **kwargs) -> None:
    """diffusers' own loading (PEFT warns about a second adapter: that is the point)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reference.load_lora_weights(str(path), adapter_name=name, **kwargs)


def assert_leases(daemon: Daemon, count: int) -> None:
    """The daemon's leases come to ``count``: a lease held by LoRA weights is released by the
    client's releaser thread soon after the last of them goes."""
    try:
        wait_until(lambda: daemon.stats().leases == count, timeout=10.0)
    except AssertionError:
        raise AssertionError(f"{daemon.stats().leases} leases, not {count}") from None


def entries_of(client, path: Path) -> list:
    return [e for e in client.list() if Path(e.path).name == path.name and e.tier == "device"]


def assert_views_of(lease, weights: list[torch.Tensor]) -> None:
    """Every factor of every layer of the lease, in every component, is a view of it."""
    storage = next(iter(lease.tensors.values())).untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    assert len(weights) == 2 * sum(key.endswith(DOWN) for key in lease.tensors)
    for weight in weights:
        assert weight.untyped_storage().data_ptr() == start
        assert start <= weight.data_ptr() < end


def diffusers_format(pipe, peft_sd: dict[str, torch.Tensor], module_alphas: dict[str, float],
                     path: Path) -> Path:
    """The same factors and per-layer ranks and alphas in diffusers' own format: each
    component's LoraConfig in the file's metadata, naming every module's rank and alpha."""
    kwargs = {}
    for component in sorted({key.split(".", 1)[0] for key in peft_sd}):
        layers = {k.split(".", 1)[1]: v for k, v in peft_sd.items()
                  if k.startswith(f"{component}.")}
        modules = sorted({k.rsplit(".lora_", 1)[0] for k in layers})
        config = LoraConfig(
            r=4, lora_alpha=4, target_modules=modules,
            rank_pattern={m: layers[f"{m}.lora_A.weight"].shape[0] for m in modules},
            alpha_pattern={m: module_alphas[f"{component}.{m}"] for m in modules}).to_dict()
        kwargs[f"{component}_lora_layers"] = layers
        kwargs[f"{component}_lora_adapter_metadata"] = {
            k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    type(pipe).save_lora_weights(path.parent, weight_name=path.name, **kwargs)
    return path


def mixed_ranks(make: Maker, pipe, **kwargs) -> dict[str, torch.Tensor]:
    """``make``'s LoRA with rank 8 for the query projections and rank 4 elsewhere."""
    rank8 = make(pipe, rank=8, seed=7, **kwargs)
    return {k: rank8[k] if ".to_q." in k or ".q_proj." in k else v
            for k, v in make(pipe, rank=4, **kwargs).items()}


ALPHAS = (1.0, 4.0, 8.0, 16.0, 3.0)


def per_layer_alphas(make: Maker, convs: bool):
    """A kohya file with a different alpha per layer and two ranks, and its oracle file.

    diffusers 0.42 misreads such files: it names their UNet alphas after the old attention
    processors (``...attn1.processor.to_k_lora.down.weight``) and the text encoders' after
    the attention blocks, PEFT ignores those patterns (a warning), and those layers get the
    most common alpha. Its oracle is then diffusers reading the same factors, ranks and alphas
    from its own format (each component's LoraConfig in the file's metadata)."""
    def files(pipe, directory: Path, name: str) -> tuple[Path, Path]:
        peft_sd = mixed_ranks(make, pipe, **({"convs": True} if convs else {}))
        kohya, module_alphas = kohya_with_alphas(peft_sd, ALPHAS)
        oracle = directory / f"{name}-diffusers.safetensors"
        return (save(kohya, directory / f"{name}.safetensors"),
                diffusers_format(pipe, peft_sd, module_alphas, oracle))
    return files


def same_file(make: Callable) -> Callable:
    def files(pipe, directory: Path, name: str) -> tuple[Path, Path]:
        path = save(make(pipe), directory / f"{name}.safetensors")
        return path, path
    return files


# format -> (family, (pipe, dir, name) -> (the file loaded through loracache, diffusers' file))
FORMATS = {
    "sd-peft": ("sd", same_file(sd_lora_peft)),
    "sd-peft-locon": ("sd", same_file(lambda pipe: sd_lora_peft(pipe, convs=True))),
    "sd-kohya": ("sd", same_file(lambda pipe: to_kohya(sd_lora_peft(pipe, rank=8), alpha=4.0))),
    "sd-legacy-diffusers": ("sd", same_file(lambda pipe: to_legacy_diffusers(sd_lora_peft(pipe)))),
    "sd-kohya-per-layer-alphas": ("sd", per_layer_alphas(sd_lora_peft, convs=True)),
    "sdxl-peft": ("sdxl", same_file(sdxl_lora_peft)),
    "sdxl-kohya": ("sdxl", same_file(lambda pipe: sdxl_to_kohya(sdxl_lora_peft(pipe, rank=8),
                                                                alpha=4.0))),
    "sdxl-kohya-per-layer-alphas": ("sdxl", per_layer_alphas(sdxl_lora_peft, convs=False)),
    "flux-peft": ("flux", same_file(flux_lora_peft)),
    # sd-scripts names with a different alpha per layer (diffusers folds them into the factors)
    "flux-kohya": ("flux", same_file(lambda pipe: flux_lora_kohya())),
    "sd3-peft": ("sd3", same_file(sd3_lora_peft)),
}


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("fmt", FORMATS)
def test_single_adapter_equals_diffusers_and_is_a_view_of_the_lease(
        pipelines, base_images, module_daemon, module_lora_dir, fmt):
    family, files = FORMATS[fmt]
    case = FAMILIES[family]
    ours, reference = copy.deepcopy(pipelines[family]), copy.deepcopy(pipelines[family])
    path, oracle_path = files(ours, module_lora_dir, fmt)
    reference.load_lora_weights(str(oracle_path), adapter_name="x")
    expected = traced(reference, case)
    assert not torch.equal(expected["image"][0], base_images[family])  # the LoRA does something
    with module_daemon.client() as client:
        load_lora_weights(ours, path, "x", client=client)
        assert_same_outputs(traced(ours, case), expected)
        assert scalings(ours, case, "x") == scalings(reference, case, "x")
        if "per-layer-alphas" in fmt:  # the oracle's own layers do differ
            assert len(set(scalings(reference, case, "x").values())) >= len(ALPHAS)
        assert ours.get_active_adapters() == ["x"]
        with client.acquire(path, device="cpu", layout=LAYOUT.format(family)) as lease:
            (entry,) = entries_of(client, path)
            assert entry.layout == LAYOUT.format(family) and entry.leases == 2
            assert_views_of(lease, lora_weights(ours, case, "x"))
        ours.unload_lora_weights()
        assert_leases(module_daemon, 0)
        assert not list(lora_modules(ours, case))


@pytest.mark.parametrize("family", DENOISERS)
def test_one_entry_per_file_lent_to_every_adapter_and_pipeline(
        pipelines, two_loras, module_daemon, module_lora_dir, family):
    """One file as two adapters of a pipeline and one of another: one entry (in the family's
    layout), every adapter's weights views of it, and one lease per adapter, going with it."""
    case = FAMILIES[family]
    path = save(two_loras(family)[0], module_lora_dir / f"shared-{family}.safetensors")
    first, second = copy.deepcopy(pipelines[family]), copy.deepcopy(pipelines[family])
    adapters = ((first, "x"), (first, "y"), (second, "x"))
    with module_daemon.client() as client:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for pipe, adapter in adapters:
                load_lora_weights(pipe, path, adapter, client=client)
        with client.acquire(path, device="cpu", layout=LAYOUT.format(family)) as lease:
            (entry,) = entries_of(client, path)
            assert entry.layout == LAYOUT.format(family) and entry.leases == 4
            for pipe, adapter in adapters:
                assert_views_of(lease, lora_weights(pipe, case, adapter))
        del adapters, pipe  # no reference to the pipelines but first and second
        assert_leases(module_daemon, 3)
        first.delete_adapters("x")
        assert_leases(module_daemon, 2)
        assert lora_weights(first, case, "y") and lora_weights(second, case, "x")
        del second  # collected (gc: a Flux pipeline that has run is in a reference cycle)
        gc.collect()
        assert_leases(module_daemon, 1)
        first.unload_lora_weights()
        assert_leases(module_daemon, 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_weighted_mix_disable_enable_and_delete_equal_diffusers(
        pipelines, base_images, two_loras, module_daemon, module_lora_dir, family):
    case = FAMILIES[family]
    first, second = two_loras(family)
    a = save(first, module_lora_dir / f"mix-{family}-a.safetensors")
    b = save(second, module_lora_dir / f"mix-{family}-b.safetensors")
    ours, reference = copy.deepcopy(pipelines[family]), copy.deepcopy(pipelines[family])
    loaded(reference, a, "a")
    loaded(reference, b, "b")
    with module_daemon.client() as client:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            load_lora_weights(ours, a, "a", client=client)
            load_lora_weights(ours, b, "b", client=client)
        assert_leases(module_daemon, 2)
        for pipe in (ours, reference):
            pipe.set_adapters(["a", "b"], [0.5, 1.3])
        mix = traced(reference, case)
        assert_same_outputs(traced(ours, case), mix)
        assert layers_of(mix, case.denoiser) > 1 and layers_of(mix, "text_encoder") > 0

        for pipe in (ours, reference):
            pipe.disable_lora()
        disabled = traced(ours, case)
        assert_same_outputs(disabled, traced(reference, case))
        assert torch.equal(disabled["image"][0], base_images[family])

        for pipe in (ours, reference):
            pipe.enable_lora()
        assert_same_outputs(traced(ours, case), mix)

        for pipe in (ours, reference):
            pipe.delete_adapters("a")
        assert_leases(module_daemon, 1)  # b's, still lent
        assert not lora_weights(ours, case, "a")
        assert ours.get_active_adapters() == reference.get_active_adapters() == ["b"]
        only_b = traced(reference, case)
        assert_same_outputs(traced(ours, case), only_b)
        assert not torch.equal(only_b["image"][0], mix["image"][0])

        ours.unload_lora_weights()
        assert_leases(module_daemon, 0)
        assert not list(lora_modules(ours, case))


def denoiser_only(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The denoiser's layers of a LoRA file (diffusers hotswaps no text encoder)."""
    return {k: v for k, v in tensors.items() if k.startswith(("unet.", "transformer.",
                                                              "lora_unet_"))}


@pytest.mark.parametrize("family", FAMILIES)
def test_hotswap_equals_diffusers(pipelines, two_loras, module_daemon, module_lora_dir, family):
    """A rank-4 adapter, then one of another rank (and alpha) swapped in, then back."""
    case = FAMILIES[family]
    first, second = (save(denoiser_only(lora), module_lora_dir / f"swap-{family}-{i}.safetensors")
                     for i, lora in enumerate(two_loras(family)))
    ours, reference = copy.deepcopy(pipelines[family]), copy.deepcopy(pipelines[family])
    for pipe in (ours, reference):
        pipe.enable_lora_hotswap(target_rank=16)
    with module_daemon.client() as client:
        outputs = []
        for hotswap, path in ((False, first), (True, second)):
            loaded(reference, path, "x", hotswap=hotswap)
            load_lora_weights(ours, path, "x", client=client, hotswap=hotswap)
            outputs.append(traced(reference, case))
            assert_same_outputs(traced(ours, case), outputs[-1])
            assert scalings(ours, case, "x") == scalings(reference, case, "x")
            # Padded to the target rank, the weights are this process's (the lease is gone).
            assert {m.lora_A["x"].weight.shape[0] for _, m in lora_modules(ours, case)} == {16}
            assert_leases(module_daemon, 0)
        assert layers_of(outputs[0], case.denoiser) > 1
        assert layers_of(outputs[0], "text_encoder") == 0
        assert not torch.equal(outputs[0]["image"][0], outputs[1]["image"][0])
        load_lora_weights(ours, first, "x", client=client, hotswap=True)
        assert_same_outputs(traced(ours, case), outputs[0])  # swapped back: the first exactly
        assert_leases(module_daemon, 0)
        ours.unload_lora_weights()


@pytest.mark.parametrize("family", DENOISERS)
def test_hotswap_into_leased_weights_equals_diffusers(
        pipelines, two_loras, module_daemon, module_lora_dir, family):
    """Without ``enable_lora_hotswap``, an adapter of the same rank swapped into one whose
    weights are views of the lease: the swap writes into this process's copies, never into
    the shared LoRA, and lets the lease go."""
    case = FAMILIES[family]
    ours, reference = copy.deepcopy(pipelines[family]), copy.deepcopy(pipelines[family])
    first = save(denoiser_only(two_loras(family)[0]),
                 module_lora_dir / f"inplace-{family}-0.safetensors")
    second = save(denoiser_only(case.peft(ours, rank=4, seed=9)),
                  module_lora_dir / f"inplace-{family}-1.safetensors")
    loaded(reference, first, "x")
    with module_daemon.client() as client:
        load_lora_weights(ours, first, "x", client=client)
        with client.acquire(first, device="cpu", layout=LAYOUT.format(family)) as lease:
            shared = {key: tensor.clone() for key, tensor in lease.tensors.items()}
            assert_views_of(lease, lora_weights(ours, case, "x"))
            loaded(reference, second, "x", hotswap=True)
            load_lora_weights(ours, second, "x", client=client, hotswap=True)
            assert_leases(module_daemon, 1)  # the test's own
            assert all(torch.equal(lease.tensors[key], value) for key, value in shared.items())
        swapped = traced(reference, case)
        assert_same_outputs(traced(ours, case), swapped)
        assert layers_of(swapped, case.denoiser) > 1
        ours.unload_lora_weights()
