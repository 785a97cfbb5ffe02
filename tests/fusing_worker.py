"""A worker process for the no-copy test: fuses one LoRA and reports its own memory (JSON)."""

import gc
import json
import sys

from loracache.client import LoraCacheClient, load_and_fuse_lora
from loracache.shared.procmem import anonymous_bytes
from tests.tiny import tiny_sd_pipeline

socket, path, memory_efficient = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
pipe = tiny_sd_pipeline()
with LoraCacheClient(socket) as client:
    gc.collect()
    before = anonymous_bytes()
    load_and_fuse_lora(pipe, path, "x", client=client, memory_efficient=memory_efficient)
    gc.collect()
    print(json.dumps({"grown": anonymous_bytes() - before}), flush=True)
