"""A demo worker: leases the LoRAs, prints checksums and its memory, fuses one into its own
tiny pipeline and prints a checksum of the image it generates; holds its leases until told."""

import hashlib
import os
import sys

import psutil
import torch

from loracache.client import LoraCacheClient, load_and_fuse_lora
from examples.tiny_models import image, tiny_sd_pipeline  # the tests build the same

socket, lora, style, name = sys.argv[1:5]
MiB = 2**20

with LoraCacheClient(socket) as client, client.acquire(lora, device="cpu") as lease:
    checksum = hashlib.sha256()
    for key in sorted(lease.tensors):
        checksum.update(lease.tensors[key].view(-1).view(torch.uint8).numpy().tobytes())
    print(f"{name} (pid {os.getpid()}): {len(lease.tensors)} tensors, "
          f"{lease.entry.nbytes / MiB:.1f} MiB, sha256 {checksum.hexdigest()[:16]}", flush=True)
    pipe = tiny_sd_pipeline()
    plain = image(pipe)
    load_and_fuse_lora(pipe, style, adapter_name="style", lora_scale=0.8, client=client)
    styled = image(pipe)
    digest = hashlib.sha256(styled.numpy().round(decimals=5).tobytes()).hexdigest()[:16]
    print(f"{name}: fused {style} into its own pipeline: image sha256 {digest}, "
          f"mean pixel change {float((styled - plain).abs().mean()):.4f}", flush=True)
    sys.stdin.readline()  # wait until both workers hold their leases, then report memory
    # PSS splits a shared page among the processes that map it (RSS counts it in full in each).
    memory = psutil.Process()
    shared = sum(m.pss for m in memory.memory_maps() if "/loracache-" in m.path)
    print(f"{name}: PSS of the shared LoRA mappings {shared / MiB:.1f} MiB "
          f"(one copy of {lease.entry.nbytes / MiB:.1f} MiB, split between its users); "
          f"whole process PSS {memory.memory_full_info().pss / MiB:.1f} MiB", flush=True)
    sys.stdin.readline()  # hold the leases until the demo is done with stats
