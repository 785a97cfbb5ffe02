"""A worker process for the integration tests: reads JSON commands on stdin, answers on stdout.

Kept deliberately dumb: it only calls the public client API, so the tests exercise exactly what
a real worker process does.
"""

import json
import logging
import os
import sys

import msgspec
import psutil
import torch
from safetensors.torch import load_file

from loracache.client import (LoraCacheClient, LoraCacheError, delete_adapters,
                              load_and_fuse_lora, unfuse_lora)
from tests.support import become, digest
from examples.tiny_models import tiny_sd_pipeline


class Remember(logging.Handler):
    """Keeps the client library's warnings, for the tests to read ("warnings" op)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


if os.environ.get("LORACACHE_TEST_BECOME"):
    import loracache.client.fusing  # noqa: F401  (the client imports these lazily)
    import loracache.client.lease  # noqa: F401

    become(os.environ["LORACACHE_TEST_BECOME"])
warnings = Remember()
logging.getLogger("loracache").addHandler(warnings)
client = None
leases = {}
kept = []
loaded = {}
pipelines = {}


def _weights(name):
    pipe = pipelines[name]
    return torch.cat([v.detach().flatten().float() for part in ("unet", "text_encoder")
                      for v in getattr(pipe, part).state_dict().values()])


def run(op, args):
    global client
    if op == "connect":
        client = LoraCacheClient(args["socket"], **args.get("options", {}))
        return {"instance": client.instance}
    if op == "acquire":
        lease = client.acquire(args["path"], device=args.get("device", "cpu"))
        leases[lease.id] = lease
        return {"lease": lease.id, "entry": lease.entry.id, "nbytes": lease.entry.nbytes,
                "digests": {k: digest(v) for k, v in lease.tensors.items()}}
    if op == "release":
        leases.pop(args["lease"]).release()
        return {}
    if op == "keep_views":  # hold every tensor of every lease, past their release
        kept.extend(t for lease in leases.values() for t in lease.tensors.values())
        return len(kept)
    if op == "drop_views":
        kept.clear()
        return {}
    if op == "touch":  # fault every page of every leased tensor in
        return sum(float(t.float().sum()) for lease in leases.values()
                   for t in lease.tensors.values())
    if op == "load_file":
        # The baseline: a worker loading the file itself. safetensors maps the file
        # copy-on-write, and loaders then copy it into their own parameters (diffusers/PEFT)
        # or convert its dtype (onediffx): either way each process ends up with its own copy.
        loaded[args["path"]] = {k: v.clone() for k, v in load_file(args["path"]).items()}
        return sum(float(t.float().sum()) for t in loaded[args["path"]].values())
    if op == "pss":
        memory = psutil.Process()
        part = args.get("path_part", "\0")
        return {"total": memory.memory_full_info().pss,
                "mapping": sum(m.pss for m in memory.memory_maps() if part in m.path)}
    if op == "cuda_allocated":  # what this process's own allocator holds on the device
        return torch.cuda.memory_allocated()
    if op == "stats":
        return msgspec.to_builtins(client.stats())
    if op == "pipeline":  # a tiny SD pipeline, the same weights for the same seed
        pipe = tiny_sd_pipeline(seed=args.get("seed", 0), smallest=True)
        pipelines[args["name"]] = pipe.to(args.get("device", "cpu"))
        return {}
    if op == "fuse":
        load_and_fuse_lora(pipelines[args["name"]], args["path"], args["adapter"], client=client,
                           fallback=args.get("fallback", "local"))
        return {}
    if op == "unfuse":
        unfuse_lora(pipelines[args["name"]])
        return {}
    if op == "delete":
        delete_adapters(pipelines[args["name"]], args.get("adapters"))
        return {}
    if op == "weights":  # a digest of every weight LoRAs may touch
        return digest(_weights(args["name"]))
    if op == "max_diff":  # how far two pipelines' weights are apart, and how large they are
        a, b = _weights(args["a"]), _weights(args["b"])
        return {"diff": float((a - b).abs().max()), "scale": float(a.abs().max())}
    if op == "lease_generations":
        return [a.lease.generation for a in pipelines[args["name"]]._loracache.adapters.values()
                if a.lease is not None]
    if op == "warnings":
        return warnings.messages
    if op == "exit":
        if client is not None:
            client.close()
        return {}
    raise ValueError(f"unknown op {op}")


for line in sys.stdin:
    command = json.loads(line)
    op = command.pop("op")
    try:
        reply = {"result": run(op, command)}
    except LoraCacheError as exc:
        reply = {"error": {"code": exc.code.value, "message": exc.message}}
    print(json.dumps(reply), flush=True)
    if op == "exit":
        break
