"""A worker process for the no-copy tests: loads one LoRA one way and reports how much its own
memory grew (JSON). Modes: ``shared`` and ``copies`` fuse it through loracache with
``memory_efficient`` on and off, ``unfused`` loads it with loracache's ``load_lora_weights``,
``diffusers`` with the pipeline's own ``load_lora_weights``."""

import gc
import json
import sys

import psutil

from examples.tiny_models import tiny_sd_pipeline
from loracache.client import LoraCacheClient, load_and_fuse_lora, load_lora_weights


def anonymous_bytes() -> int:
    """Memory backed by no file: a private copy of a LoRA lands here, a mapping of the
    daemon's shared-memory file does not (even when no other process maps it yet)."""
    return sum(m.anonymous for m in psutil.Process().memory_maps(grouped=False))


socket, path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
pipe = tiny_sd_pipeline()
with LoraCacheClient(socket) as client:
    gc.collect()
    before = anonymous_bytes()
    if mode in ("shared", "copies"):
        load_and_fuse_lora(pipe, path, "x", client=client, memory_efficient=mode == "shared")
    elif mode == "unfused":
        load_lora_weights(pipe, path, "x", client=client)
    else:
        pipe.load_lora_weights(path, adapter_name="x")
    gc.collect()
    print(json.dumps({"grown": anonymous_bytes() - before}), flush=True)
