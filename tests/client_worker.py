"""A worker process for the integration tests: reads JSON commands on stdin, answers on stdout.

Kept deliberately dumb: it only calls the public client API, so the tests exercise exactly what
a real worker process does.
"""

import json
import sys

import torch
from safetensors.torch import load_file

from loracache.client import LoraCacheClient, LoraCacheError
from loracache.shared.procmem import mapping_pss_bytes, pss_bytes
from tests.support import digest

client = None
leases = {}
loaded = {}


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
    if op == "touch":  # fault every page of every leased tensor in
        return sum(float(t.float().sum()) for l in leases.values() for t in l.tensors.values())
    if op == "load_file":
        # The baseline: a worker loading the file itself. safetensors maps the file
        # copy-on-write, and loaders then copy it into their own parameters (diffusers/PEFT)
        # or convert its dtype (onediffx): either way each process ends up with its own copy.
        loaded[args["path"]] = {k: v.clone() for k, v in load_file(args["path"]).items()}
        return sum(float(t.float().sum()) for t in loaded[args["path"]].values())
    if op == "pss":
        return {"total": pss_bytes(), "mapping": mapping_pss_bytes(args.get("path_part", "\0"))}
    if op == "cuda_allocated":  # what this process's own allocator holds on the device
        return torch.cuda.memory_allocated()
    if op == "stats":
        return client.stats()
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
