"""fuse: fusing a cached LoRA into an SD 1.5-shaped UNet, and switching from one LoRA to another,
against diffusers' load_lora_weights + fuse_lora and against the bare work.

The UNet has the real SD 1.5 shapes (860 M parameters) and random weights; it is built on the
meta device and filled from a small random pool, which takes a second instead of the minute of
the default initialisation. The LoRAs are random, in diffusers' PEFT keys and fp16 like real
files, on every attention projection, feed-forward and proj_in/proj_out layer of the UNet
(256 tensors). Per dtype (float32, bfloat16) and rank (16, 128), in the same run:

- loracache fuse: ``load_and_fuse_lora`` of a LoRA already in the daemon's cache (converted to
  the SD layout), undone after each repetition by ``delete_adapters`` (timed apart, as unfuse);
- loracache switch, two ways: ``set_and_fuse_adapters`` with both LoRAs loaded (one pass over
  each touched weight), and ``delete_adapters`` + ``load_and_fuse_lora`` (two passes);
- diffusers: ``load_lora_weights`` + ``fuse_lora``, and its switch sequence ``unfuse_lora``,
  ``unload_lora_weights``, ``load_lora_weights``, ``fuse_lora``;
- the bare work, the physical limit: the same GEMMs and in-place weight updates written
  directly in torch, with the LoRA tensors already in memory. Per layer, fuse is
  ``W += s * B @ A`` computed in float32 (an ``addmm_`` straight into a float32 weight; a
  float32 copy, ``addmm_`` and ``copy_`` back for bfloat16); switch is the same with two GEMMs,
  ``W += s * (B2 @ A2 - B1 @ A1)``, in one pass. The table also shows the naive one-liner
  ``W.copy_((W.float() + s * (B.float() @ A.float())).to(W.dtype))`` for comparison.

A switch is timed both ways (A to B, then B to A), so each repetition gives two samples. The
cases alternate within each repetition so that drift on the machine hits them all alike.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from loracache.client import (LoraCacheClient, delete_adapters, load_and_fuse_lora,
                              set_and_fuse_adapters)

from .common import (MiB, DaemonProcess, Report, Target, median, ms, ratio, scratch_dir,
                     warm_page_cache, x)

TARGET_VS_BARE = 1.5  # every loracache fuse and switch at most 1.5 x the bare work
TARGET_VS_DIFFUSERS = 0.1  # a cached rank-16 LoRA fuses at least 10 x faster than diffusers

SD15_UNET = dict(  # the UNet of runwayml/stable-diffusion-v1-5 (its config.json)
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, in_channels=4, out_channels=4, sample_size=64, norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"))
# What a typical SD 1.5 LoRA trains: every attention projection, the feed-forward layers and
# the transformers' proj_in/proj_out (1x1 convolutions in SD 1.5).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in",
                "proj_out")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

BARE, NAIVE = "bare work: fuse", "bare work, naive one-liner: fuse"
LC_FUSE, LC_UNFUSE = "loracache fuse (cached)", "loracache unfuse (delete_adapters)"
DF_FUSE, DF_UNFUSE = "diffusers load + fuse", "diffusers unfuse + unload"
BARE_SWITCH = "bare work: switch"
LC_SWITCH_SET = "loracache switch: set_and_fuse_adapters"
LC_SWITCH_RELOAD = "loracache switch: delete + load_and_fuse"
DF_SWITCH = "diffusers switch: unfuse, unload, load, fuse"

Samples = dict[str, list[float]]
Layer = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # weight as 2-D, down A, up B (2-D)


def run(quick: bool) -> Report:
    repetitions = 1 if quick else 3
    configs = [("float32", 16)] if quick else [
        ("float32", 16), ("float32", 128), ("bfloat16", 16), ("bfloat16", 128)]
    ranks = sorted({rank for _, rank in configs})
    _quiet_diffusers()
    started = time.monotonic()
    results: dict[tuple[str, int], Samples] = {}
    with scratch_dir() as loras:
        shapes = _lora_shapes()
        files = {rank: {name: _write_peft_lora(loras / f"r{rank}-{name}.safetensors", shapes,
                                               rank, seed=rank + i)
                        for i, name in enumerate("ab")} for rank in ranks}
        for pair in files.values():
            for path in pair.values():
                warm_page_cache(path)
        with DaemonProcess(loras, max_bytes="2GiB") as daemon, daemon.client() as client:
            for rank in ranks:
                for path in files[rank].values():
                    client.preload(path, layout="sd")  # "a cached LoRA": converted once
            misses = _misses(client)
            for dtype_name in dict.fromkeys(d for d, _ in configs):
                pipe = _sd15_pipeline(DTYPES[dtype_name])
                try:
                    for rank in [r for d, r in configs if d == dtype_name]:
                        bench = _Bench(pipe, client, files[rank]["a"], files[rank]["b"])
                        results[dtype_name, rank] = bench.measure(repetitions)
                        del bench
                        gc.collect()
                finally:
                    del pipe
                    gc.collect()
            if _misses(client) != misses:
                raise RuntimeError("a timed loracache fuse missed the cache: "
                                   f"{_misses(client) - misses} misses")
        sizes = {rank: files[rank]["a"].stat().st_size for rank in ranks}
    return _report(results, shapes, sizes, repetitions, time.monotonic() - started)


# ---------------------------------------------------------------------------- the cases


class _Bench:
    """The cases of one (pipeline dtype, rank). Each case starts and ends with nothing fused
    (up to rounding: bfloat16 weights drift a little with every fuse and unfuse, which does
    not change the timings), and chains its steps so that few of them go untimed."""

    def __init__(self, pipe: Any, client: LoraCacheClient, path_a: Path, path_b: Path) -> None:
        self.pipe, self.client, self.paths = pipe, client, {"a": path_a, "b": path_b}
        self.layers = {name: _bare_layers(pipe.unet, path) for name, path in self.paths.items()}

    def measure(self, repetitions: int) -> Samples:
        cases: list[Callable[[], Samples]] = [self.bare, self.naive, self.loracache,
                                              self.diffusers]
        samples: Samples = {}
        for _ in range(repetitions):
            for case in cases:
                for name, values in case().items():
                    samples.setdefault(name, []).extend(values)
        return samples

    def bare(self) -> Samples:
        a, b = self.layers["a"], self.layers["b"]
        fuse = _timed(lambda: _bare_update(a, 1.0))
        there = _timed(lambda: _bare_switch(a, b))
        back = _timed(lambda: _bare_switch(b, a))
        _bare_update(a, -1.0)
        return {BARE: [fuse], BARE_SWITCH: [there, back]}

    def naive(self) -> Samples:
        fuse = _timed(lambda: _naive_update(self.layers["a"], 1.0))
        _bare_update(self.layers["a"], -1.0)
        return {NAIVE: [fuse]}

    def loracache(self) -> Samples:
        pipe = self.pipe
        fuse = _timed(lambda: self._lc_load("a"))
        there = _timed(lambda: (delete_adapters(pipe, "a"), self._lc_load("b")))
        back = _timed(lambda: (delete_adapters(pipe, "b"), self._lc_load("a")))
        self._lc_load("b")  # both loaded (and fused) now: the way set_and_fuse_adapters
        set_and_fuse_adapters(pipe, ["a"])  # switches between loaded adapters
        set_there = _timed(lambda: set_and_fuse_adapters(pipe, ["b"]))
        set_back = _timed(lambda: set_and_fuse_adapters(pipe, ["a"]))
        unfuse = _timed(lambda: delete_adapters(pipe))  # only "a" is fused
        return {LC_FUSE: [fuse], LC_UNFUSE: [unfuse], LC_SWITCH_SET: [set_there, set_back],
                LC_SWITCH_RELOAD: [there, back]}

    def diffusers(self) -> Samples:
        fuse = _timed(lambda: self._df_load("a"))
        there = _timed(lambda: (self._df_unload(), self._df_load("b")))
        back = _timed(lambda: (self._df_unload(), self._df_load("a")))
        unfuse = _timed(self._df_unload)
        return {DF_FUSE: [fuse], DF_UNFUSE: [unfuse], DF_SWITCH: [there, back]}

    def _lc_load(self, name: str) -> None:
        load_and_fuse_lora(self.pipe, self.paths[name], name, client=self.client,
                           fallback="error")

    def _df_load(self, name: str) -> None:
        self.pipe.load_lora_weights(str(self.paths[name]), adapter_name=name)
        self.pipe.fuse_lora()

    def _df_unload(self) -> None:
        self.pipe.unfuse_lora()
        self.pipe.unload_lora_weights()


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# ------------------------------------------------------------------------------- bare work


def _bare_layers(unet: torch.nn.Module, path: Path) -> list[Layer]:
    """Each LoRA layer of the file at ``path`` as (the weight it updates, viewed 2-D, A, B),
    the factors as the file holds them (fp16). No alpha in these files, so s = 1."""
    tensors = load_file(str(path))
    layers = []
    for key, down in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("unet.").removesuffix(".lora_A.weight")
        up = tensors[key.replace(".lora_A.", ".lora_B.")]
        weight = unet.get_submodule(module).weight
        layers.append((weight.detach().view(weight.shape[0], -1), down.flatten(1),
                       up.flatten(1)))
    return layers


@torch.no_grad()
def _bare_update(layers: list[Layer], scale: float) -> None:
    """W += scale * B @ A for each layer, in float32, in place."""
    for weight, down, up in layers:
        acc = weight if weight.dtype == torch.float32 else weight.float()
        acc.addmm_(up.float(), down.float(), alpha=scale)
        if acc is not weight:
            weight.copy_(acc)


@torch.no_grad()
def _bare_switch(old: list[Layer], new: list[Layer]) -> None:
    """W += B2 @ A2 - B1 @ A1 for each layer, in float32, in one pass."""
    for (weight, down_old, up_old), (_, down_new, up_new) in zip(old, new):
        acc = weight if weight.dtype == torch.float32 else weight.float()
        acc.addmm_(up_old.float(), down_old.float(), alpha=-1.0)
        acc.addmm_(up_new.float(), down_new.float())
        if acc is not weight:
            weight.copy_(acc)


@torch.no_grad()
def _naive_update(layers: list[Layer], scale: float) -> None:
    for weight, down, up in layers:
        weight.copy_((weight.float() + scale * (up.float() @ down.float())).to(weight.dtype))


# ------------------------------------------------------------------- the model and the LoRAs


def _sd15_unet(dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The SD 1.5 UNet, on the meta device (shapes only) or filled with small random values.

    Filling copies windows of one random pool at random offsets: memory-bound, about a second,
    where initialising each layer (or drawing 860 M normal values) takes tens of seconds here.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET).to(dtype)
    if device == "meta":
        return unet
    unet.to_empty(device=device)
    generator = torch.Generator().manual_seed(0)
    params = list(unet.parameters())
    largest = max(p.numel() for p in params)
    pool = (torch.randn(2 * largest, generator=generator) * 0.02).to(dtype)
    offsets = torch.randint(0, largest, (len(params),), generator=generator).tolist()
    with torch.no_grad():
        for param, offset in zip(params, offsets):
            param.view(-1).copy_(pool[offset:offset + param.numel()])
    return unet.eval()


def _sd15_pipeline(dtype: torch.dtype) -> Any:
    """A StableDiffusionPipeline with only the UNet: both loracache (which finds the family
    from the pipeline's LoRA loader mixin) and diffusers' LoRA loader work on it."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        unet=_sd15_unet(dtype, "cpu"), vae=None, text_encoder=None, tokenizer=None,
        scheduler=None, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def _lora_shapes() -> dict[str, torch.Size]:
    """Module path -> weight shape of every layer the LoRAs train."""
    unet = _sd15_unet(torch.float32, "meta")
    return {name: module.weight.shape for name, module in unet.named_modules()
            if name.endswith(LORA_TARGETS) and isinstance(module, (torch.nn.Linear,
                                                                    torch.nn.Conv2d))}


def _write_peft_lora(path: Path, shapes: dict[str, torch.Size], rank: int, seed: int) -> Path:
    """A random fp16 LoRA in diffusers' PEFT keys (``unet.<module>.lora_A.weight``, no alpha);
    convolution factors are (rank, in, 1, 1) and (out, rank, 1, 1), as PEFT writes them."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, shape in shapes.items():
        out, rest = shape[0], shape[1:]
        tail = (1,) * (len(shape) - 2)
        tensors[f"unet.{module}.lora_A.weight"] = (
            torch.randn(rank, *rest, generator=generator) / rest.numel() ** 0.5).half()
        tensors[f"unet.{module}.lora_B.weight"] = (
            torch.randn(out, rank, *tail, generator=generator) * 0.01).half()
    save_file(tensors, str(path))
    return path


def _misses(client: LoraCacheClient) -> int:
    return next(d for d in client.stats()["devices"] if d["device"] == "cpu")["misses"]


def _quiet_diffusers() -> None:
    """diffusers and PEFT warn on every load of a UNet-only LoRA into a pipeline without a text
    encoder; the benchmark's output should be its table."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------- report


def _report(results: dict[tuple[str, int], Samples], shapes: dict[str, torch.Size],
            sizes: dict[int, int], repetitions: int, elapsed: float) -> Report:
    params = sum(shape.numel() for shape in shapes.values())
    rows, targets, data = [], [], {}
    for (dtype_name, rank), samples in results.items():
        med = {name: median(values) for name, values in samples.items()}
        gflop = 2 * rank * params / 1e9
        baselines = {BARE: BARE, NAIVE: BARE, LC_FUSE: BARE, DF_FUSE: BARE, LC_UNFUSE: BARE,
                     DF_UNFUSE: BARE, BARE_SWITCH: BARE_SWITCH, LC_SWITCH_SET: BARE_SWITCH,
                     LC_SWITCH_RELOAD: BARE_SWITCH, DF_SWITCH: BARE_SWITCH}
        for name, values in samples.items():
            vs_diffusers = {LC_FUSE: DF_FUSE, LC_UNFUSE: DF_UNFUSE, LC_SWITCH_SET: DF_SWITCH,
                            LC_SWITCH_RELOAD: DF_SWITCH}.get(name)
            rows.append([dtype_name, rank, name, ms(med[name]), ms(min(values)), ms(max(values)),
                         x(ratio(med[name], med[baselines[name]])),
                         x(ratio(med[vs_diffusers], med[name])) if vs_diffusers else ""])
        label = f"{dtype_name} r{rank}"
        for name in (LC_FUSE, LC_SWITCH_SET, LC_SWITCH_RELOAD):
            targets.append(Target(f"{label}: {name} / bare work", ratio(med[name],
                                  med[baselines[name]]), TARGET_VS_BARE))
        if rank == 16:
            targets.append(Target(f"{label}: {LC_FUSE} / {DF_FUSE}",
                                  ratio(med[LC_FUSE], med[DF_FUSE]), TARGET_VS_DIFFUSERS))
        data[label] = {"samples_s": samples, "median_s": med, "gflop_fuse": gflop,
                       "bare_fuse_gflops": gflop / med[BARE],
                       "diffusers_over_loracache_fuse": ratio(med[DF_FUSE], med[LC_FUSE]),
                       "loracache_fuse_over_bare": ratio(med[LC_FUSE], med[BARE])}
    data.update({"lora_layers": len(shapes), "lora_tensors": 2 * len(shapes),
                 "weights_touched": params, "lora_file_bytes": sizes, "repetitions": repetitions,
                 "torch_threads": torch.get_num_threads(), "elapsed_s": elapsed})
    return Report(
        name="fuse",
        title=f"fuse and switch of a {len(shapes)}-layer LoRA on an SD 1.5 UNet (CPU, "
              f"{params / 1e6:.0f} M weights touched), median of {repetitions} (switches: "
              f"{2 * repetitions}, both ways)",
        headers=["dtype", "rank", "case", "median", "min", "max", "/ bare work",
                 "diffusers / this"],
        rows=rows, targets=targets, data=data,
        notes=["'/ bare work': fuse and unfuse rows over the bare fuse, switch rows over the "
               "bare switch (both GEMMs in one pass over each weight)",
               "'diffusers / this': the diffusers row of the same kind over this row (how many "
               "times faster loracache is)",
               f"LoRA files: {', '.join(f'rank {r} {s / MiB:.1f} MiB' for r, s in sizes.items())}"
               f"; a fuse is {2 * params / 1e9:.2f} x rank GFLOP"])
