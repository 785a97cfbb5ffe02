"""A demo worker: acquires the LoRA, prints a checksum and its memory, holds the lease."""

import hashlib
import os
import sys

import torch

from loracache.client import LoraCacheClient
from loracache.shared.procmem import mapping_pss_bytes, pss_bytes

socket, lora, name = sys.argv[1:4]
MiB = 2**20

with LoraCacheClient(socket) as client, client.acquire(lora, device="cpu") as lease:
    checksum = hashlib.sha256()
    for key in sorted(lease.tensors):
        checksum.update(lease.tensors[key].view(-1).view(torch.uint8).numpy().tobytes())
    print(f"{name} (pid {os.getpid()}): {len(lease.tensors)} tensors, "
          f"{lease.entry.nbytes / MiB:.1f} MiB, sha256 {checksum.hexdigest()[:16]}", flush=True)
    sys.stdin.readline()  # wait until both workers hold the lease, then report memory
    shared = mapping_pss_bytes("/loracache-")
    print(f"{name}: PSS of the shared LoRA mapping {shared / MiB:.1f} MiB "
          f"(the copy is {lease.entry.nbytes / MiB:.1f} MiB, split between its users); "
          f"whole process PSS {pss_bytes() / MiB:.1f} MiB", flush=True)
    sys.stdin.readline()  # hold the lease until the demo is done with stats
