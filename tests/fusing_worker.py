"""A worker process for the no-copy test: fuses one LoRA and reports its own memory (JSON)."""

import gc
import json
import sys

import psutil

from examples.tiny_models import tiny_sd_pipeline
from loracache.client import LoraCacheClient, load_and_fuse_lora


def anonymous_bytes() -> int:
    """Memory backed by no file: a private copy of a LoRA lands here, a mapping of the
    daemon's shared-memory file does not (even when no other process maps it yet)."""
    return sum(m.anonymous for m in psutil.Process().memory_maps(grouped=False))


socket, path, memory_efficient = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
pipe = tiny_sd_pipeline()
with LoraCacheClient(socket) as client:
    gc.collect()
    before = anonymous_bytes()
    load_and_fuse_lora(pipe, path, "x", client=client, memory_efficient=memory_efficient)
    gc.collect()
    print(json.dumps({"grown": anonymous_bytes() - before}), flush=True)
