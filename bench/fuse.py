"""fuse: fusing a cached LoRA into an SD 1.5-shaped UNet, and switching from one LoRA to another,
against diffusers' load_lora_weights + fuse_lora and against the bare work.

The UNet has the real SD 1.5 shapes (860 M parameters) and random weights; it is built on the
meta device and filled from a small random pool, a few seconds instead of the default
initialisation's minute. The LoRAs are random, in diffusers' PEFT keys and fp16 like real files,
on every attention projection, feed-forward and proj_in/proj_out layer of the UNet (192 layers,
267 M weights; the text encoder is left out). Per dtype (float32, bfloat16) and rank (16, 128),
in the same run:

- loracache fuse: ``load_and_fuse_lora`` of a LoRA already in the daemon's cache (converted to
  the SD layout), so a hit; undone by ``delete_adapters`` (timed apart, as unfuse);
- loracache switch, two ways: ``set_and_fuse_adapters`` with both LoRAs loaded (one pass over
  each touched weight), and ``delete_adapters`` + ``load_and_fuse_lora`` (two passes);
- diffusers: ``load_lora_weights`` + ``fuse_lora``, and its switch sequence ``unfuse_lora``,
  ``unload_lora_weights``, ``load_lora_weights``, ``fuse_lora``;
- the bare work, the physical limit: the same GEMMs and in-place weight updates written
  directly in torch, with the LoRA tensors already in memory. Per layer, fuse is
  ``W += s * B @ A`` computed in float32: an ``addmm_`` straight into a float32 weight; for
  bfloat16, 4 MiB of float32 rows at a time in one reused buffer (copy in, ``addmm_``, copy
  back). Switch is the same with two GEMMs, ``W += s * (B2 @ A2 - B1 @ A1)``, in one pass. The
  table also shows the naive one-liner
  ``W.copy_((W.float() + s * (B.float() @ A.float())).to(W.dtype))`` for comparison.

A switch is timed both ways (A to B, then B to A), so each repetition gives two samples. The
cases alternate within each repetition so that drift on the machine hits them all alike.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from examples.model_shapes import SD15_UNET, random_unet, sd15_pipeline
from loracache.client import (LoraCacheClient, delete_adapters, load_and_fuse_lora,
                              set_and_fuse_adapters)

from .common import (MiB, bench_daemon, Report, Target, median, ms, ratio, scratch_dir,
                     warm_page_cache, x)

TARGET_VS_BARE = 1.5  # every loracache fuse and switch at most 1.5 x the bare work
TARGET_VS_DIFFUSERS = 0.1  # a cached rank-16 LoRA fuses at least 10 x faster than diffusers
# The bare work updates a non-float32 weight through float32 rows of this size, reused: the
# fastest we measured (a 2-core EPYC: 4 MiB beat whole layers by 15 %, fresh per-layer
# temporaries by 2 x at rank 16; 256 KiB was 2 x slower). float32 weights need no copy.
BARE_CHUNK_BYTES = 4 << 20

# What a typical SD 1.5 LoRA trains: every attention projection, the feed-forward layers and
# the transformers' proj_in/proj_out (1x1 convolutions in SD 1.5).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in",
                "proj_out")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

BARE, NAIVE = "bare work: fuse", "bare work, naive one-liner: fuse"
LC_FUSE, LC_UNFUSE = "loracache fuse (cached)", "loracache unfuse (delete_adapters)"
DF_FUSE, DF_UNFUSE = "diffusers load + fuse", "diffusers unfuse + unload"
DF_LOAD_PART, DF_FUSE_PART = "  of which load_lora_weights", "  of which fuse_lora"
BARE_SWITCH = "bare work: switch"
LC_SWITCH_SET = "loracache switch: set_and_fuse_adapters"
LC_SWITCH_RELOAD = "loracache switch: delete + load_and_fuse"
DF_SWITCH = "diffusers switch: unfuse, unload, load, fuse"

Samples = dict[str, list[float]]
Layer = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # weight as 2-D, down A, up B (2-D)


def run(quick: bool) -> Report:
    repetitions = {16: 1} if quick else {16: 5, 128: 3}  # by rank
    configs = [("float32", 16)] if quick else [
        ("float32", 16), ("float32", 128), ("bfloat16", 16), ("bfloat16", 128)]
    ranks = sorted({rank for _, rank in configs})
    _quiet_diffusers()
    machine = _MachineLoad()
    results: dict[tuple[str, int], Samples] = {}
    with scratch_dir() as loras:
        shapes = _lora_shapes()
        files = {rank: {name: _write_peft_lora(loras / f"r{rank}-{name}.safetensors", shapes,
                                               rank, seed=rank + i)
                        for i, name in enumerate("ab")} for rank in ranks}
        for pair in files.values():
            for path in pair.values():
                warm_page_cache(path)
        with bench_daemon(loras, max_bytes="2GiB") as daemon, daemon.client() as client:
            for rank in ranks:
                for path in files[rank].values():
                    client.preload(path, layout="sd")  # "a cached LoRA": converted once
            misses = _misses(client)
            for dtype_name in dict.fromkeys(d for d, _ in configs):
                pipe = sd15_pipeline(DTYPES[dtype_name])
                try:
                    for i, rank in enumerate(r for d, r in configs if d == dtype_name):
                        bench = _Bench(pipe, client, files[rank]["a"], files[rank]["b"])
                        bench.warm_up(everything=i == 0)
                        results[dtype_name, rank] = bench.measure(repetitions[rank])
                        del bench
                        gc.collect()
                finally:
                    del pipe
                    gc.collect()
            if _misses(client) != misses:
                raise RuntimeError("a timed loracache fuse missed the cache: "
                                   f"{_misses(client) - misses} misses")
        sizes = {rank: files[rank]["a"].stat().st_size for rank in ranks}
    return _report(results, shapes, sizes, repetitions, machine.stop())


# ---------------------------------------------------------------------------- the cases


class _Bench:
    """The cases of one (pipeline dtype, rank). Each case starts and ends with nothing fused
    (up to rounding: bfloat16 weights drift a little with every fuse and unfuse, which does
    not change the timings), and chains its steps so that few of them go untimed."""

    def __init__(self, pipe: Any, client: LoraCacheClient, path_a: Path, path_b: Path) -> None:
        self.pipe, self.client, self.paths = pipe, client, {"a": path_a, "b": path_b}
        self.layers = {name: _bare_layers(pipe.unet, path) for name, path in self.paths.items()}
        self.workspace = _bare_workspace(self.layers["a"])

    def warm_up(self, everything: bool) -> None:
        """First calls pay for imports, allocator growth and the like; not what is measured."""
        _bare_update(self.layers["a"], 1.0, self.workspace)
        _bare_update(self.layers["a"], -1.0, self.workspace)
        if everything:
            self._lc_load("a")
            delete_adapters(self.pipe)
            self._df_load("a")
            self._df_unload()

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
        a, b, workspace = self.layers["a"], self.layers["b"], self.workspace
        fuse = _timed(lambda: _bare_update(a, 1.0, workspace))
        there = _timed(lambda: _bare_switch(a, b, workspace))
        back = _timed(lambda: _bare_switch(b, a, workspace))
        _bare_update(a, -1.0, workspace)
        return {BARE: [fuse], BARE_SWITCH: [there, back]}

    def naive(self) -> Samples:
        fuse = _timed(lambda: _naive_update(self.layers["a"], 1.0))
        _bare_update(self.layers["a"], -1.0, self.workspace)
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
        load = _timed(lambda: self.pipe.load_lora_weights(str(self.paths["a"]),
                                                          adapter_name="a"))
        fuse = _timed(self.pipe.fuse_lora)
        there = _timed(lambda: (self._df_unload(), self._df_load("b")))
        back = _timed(lambda: (self._df_unload(), self._df_load("a")))
        unfuse = _timed(self._df_unload)
        return {DF_FUSE: [load + fuse], DF_LOAD_PART: [load], DF_FUSE_PART: [fuse],
                DF_UNFUSE: [unfuse], DF_SWITCH: [there, back]}

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


def _bare_workspace(layers: list[Layer]) -> torch.Tensor:
    """The float32 rows a non-float32 weight is updated in, allocated once."""
    return torch.zeros(max(_bare_step(w) * w.shape[1] for w, _, _ in layers))


def _bare_step(weight: torch.Tensor) -> int:
    return max(1, BARE_CHUNK_BYTES // (4 * weight.shape[1]))


@torch.no_grad()
def _bare_apply(weight: torch.Tensor, terms: list[tuple[torch.Tensor, torch.Tensor, float]],
                workspace: torch.Tensor) -> None:
    """weight += sum of scale * B @ A over ``terms`` (A, B, scale), in float32, in place: an
    ``addmm_`` straight into a float32 weight, else through float32 rows of ``workspace``."""
    terms = [(down.float(), up.float(), scale) for down, up, scale in terms]
    if weight.dtype == torch.float32:
        for down, up, scale in terms:
            weight.addmm_(up, down, alpha=scale)
        return
    step = _bare_step(weight)
    for start in range(0, weight.shape[0], step):
        rows = weight[start:start + step]
        acc = workspace[:rows.numel()].view(rows.shape)
        acc.copy_(rows)
        for down, up, scale in terms:
            acc.addmm_(up[start:start + step], down, alpha=scale)
        rows.copy_(acc)


def _bare_update(layers: list[Layer], scale: float, workspace: torch.Tensor) -> None:
    """W += scale * B @ A for each layer."""
    for weight, down, up in layers:
        _bare_apply(weight, [(down, up, scale)], workspace)


def _bare_switch(old: list[Layer], new: list[Layer], workspace: torch.Tensor) -> None:
    """W += B2 @ A2 - B1 @ A1 for each layer, in one pass."""
    for (weight, down_old, up_old), (_, down_new, up_new) in zip(old, new):
        _bare_apply(weight, [(down_old, up_old, -1.0), (down_new, up_new, 1.0)], workspace)


@torch.no_grad()
def _naive_update(layers: list[Layer], scale: float) -> None:
    for weight, down, up in layers:
        weight.copy_((weight.float() + scale * (up.float() @ down.float())).to(weight.dtype))


# ------------------------------------------------------------------- the model and the LoRAs


def _lora_shapes(config: dict[str, Any] = SD15_UNET) -> dict[str, torch.Size]:
    """Module path -> weight shape of every layer the LoRAs train."""
    unet = random_unet(config, torch.float32, "meta")
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


class _MachineLoad:
    """How much of the machine's CPU time other processes took while the benchmark ran.

    Fusing is bound by memory bandwidth and by GEMMs spread over every core, so work elsewhere
    on the machine slows it a lot and unevenly (on a busy 2-core machine some steps took 20 x
    longer); the report says so rather than hiding it. Linux only (``/proc/stat``); elsewhere
    the share is not reported."""

    def __init__(self) -> None:
        self.started, self.busy, self.own = time.monotonic(), _busy_cpu_s(), _own_cpu_s()

    def stop(self) -> dict[str, float | None]:
        elapsed = time.monotonic() - self.started
        busy = _busy_cpu_s()
        share = None
        if busy is not None and self.busy is not None:
            others = max(0.0, busy - self.busy - (_own_cpu_s() - self.own))
            share = others / (elapsed * (os.cpu_count() or 1))
        return {"elapsed_s": elapsed, "others_cpu_share": share,
                "loadavg_end": os.getloadavg()[0]}


def _busy_cpu_s() -> float | None:
    """Seconds of CPU time spent by everything on the machine since boot, idle excluded."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU time of this process and of its children (the daemon's counts once it is reaped;
    it idles while fusing, so it is counted as another process's, a few hundredths at most)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _misses(client: LoraCacheClient) -> int:
    return client.stats().device("cpu").misses


def _quiet_diffusers() -> None:
    """diffusers and PEFT warn on every load of a UNet-only LoRA into a pipeline without a text
    encoder; the benchmark's output should be its table."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------- report


ROWS = [  # (case, the bare case it is compared with, the diffusers case of the same kind)
    (BARE, BARE, None), (NAIVE, BARE, None), (LC_FUSE, BARE, DF_FUSE), (DF_FUSE, BARE, None),
    (DF_LOAD_PART, BARE, None), (DF_FUSE_PART, BARE, None),
    (LC_UNFUSE, BARE, DF_UNFUSE), (DF_UNFUSE, BARE, None),
    (BARE_SWITCH, BARE_SWITCH, None), (LC_SWITCH_SET, BARE_SWITCH, DF_SWITCH),
    (LC_SWITCH_RELOAD, BARE_SWITCH, DF_SWITCH), (DF_SWITCH, BARE_SWITCH, None)]


def _report(results: dict[tuple[str, int], Samples], shapes: dict[str, torch.Size],
            sizes: dict[int, int], repetitions: dict[int, int],
            machine: dict[str, float | None]) -> Report:
    params = sum(shape.numel() for shape in shapes.values())
    rows, targets, data = [], [], {}
    for (dtype_name, rank), samples in results.items():
        med = {name: median(values) for name, values in samples.items()}
        for name, bare, diffusers in ROWS:
            values = samples[name]
            rows.append([dtype_name, rank, name, ms(med[name]), ms(min(values)), ms(max(values)),
                         x(ratio(med[name], med[bare])),
                         x(ratio(med[diffusers], med[name])) if diffusers else ""])
        label = f"{dtype_name} r{rank}"
        for name, bare, _ in ROWS:
            if name in (LC_FUSE, LC_SWITCH_SET, LC_SWITCH_RELOAD):
                targets.append(Target(f"{label}: {name} / bare work",
                                      ratio(med[name], med[bare]), TARGET_VS_BARE))
        if rank == 16:
            targets.append(Target(f"{label}: {LC_FUSE} / {DF_FUSE}",
                                  ratio(med[LC_FUSE], med[DF_FUSE]), TARGET_VS_DIFFUSERS))
        gflop = 2 * rank * params / 1e9
        data[label] = {
            "samples_s": samples, "median_s": med, "gflop_per_fuse": gflop,
            "bare_fuse_gflops": gflop / med[BARE],
            "diffusers_over_loracache_fuse": ratio(med[DF_FUSE], med[LC_FUSE]),
            "diffusers_over_bare_fuse": ratio(med[DF_FUSE], med[BARE]),
            "loracache_over_bare": {name: ratio(med[name], med[bare]) for name, bare, _ in ROWS
                                    if name.startswith("loracache")}}
    data.update({"lora_layers": len(shapes), "weights_touched": params,
                 "lora_file_bytes": sizes, "repetitions": repetitions,
                 "torch_threads": torch.get_num_threads(), **machine})
    counts = [(rank, n) for rank, n in repetitions.items() if rank in sizes]
    reps = (f"medians of {counts[0][1]} repetitions at rank {counts[0][0]}, " + ", ".join(
        f"{n} at rank {rank}" for rank, n in counts[1:]) if len(counts) > 1
        else f"median of {counts[0][1]} repetition{'s' if counts[0][1] > 1 else ''}")
    return Report(
        name="fuse",
        title=f"fuse and switch of a {len(shapes)}-layer LoRA on an SD 1.5 UNet (CPU, "
              f"{params / 1e6:.0f} M weights touched); {reps}",
        headers=["dtype", "rank", "case", "median", "min", "max", "/ bare work",
                 "diffusers / this"],
        rows=rows, targets=targets, data=data,
        notes=["'/ bare work': fuse and unfuse rows over the bare fuse, switch rows over the "
               "bare switch (both GEMMs in one pass over each weight); a switch has two "
               "samples per repetition (A to B and back)",
               "'diffusers / this': the diffusers row of the same kind over this row, i.e. "
               "how many times faster loracache is",
               "diffusers load + fuse over the bare fuse is the most any fuser could gain on "
               "diffusers here: " + ", ".join(
                   f"{label} {d['diffusers_over_bare_fuse']:.1f} x" for label, d in data.items()
                   if isinstance(d, dict) and "diffusers_over_bare_fuse" in d),
               f"LoRA files: {', '.join(f'rank {r} {s / MiB:.1f} MiB' for r, s in sizes.items())}"
               f"; a fuse is {2 * params / 1e9:.2f} x rank GFLOP; torch uses "
               f"{torch.get_num_threads()} threads",
               _load_note(machine)])


def _load_note(machine: dict[str, float | None]) -> str:
    share = machine["others_cpu_share"]
    if share is None:
        return "the load of other processes was not measured (no /proc/stat)"
    verdict = ("the machine was busy: timings are inflated, unevenly; the min column suffers "
               "least" if share > 0.1 else "the machine was otherwise quiet")
    return f"other processes used {share:.0%} of the CPUs during the run: {verdict}"
