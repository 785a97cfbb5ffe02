"""`make demo`: the daemon on its default settings, and two worker processes sharing one LoRA.

1. generates two demo LoRAs in a LoRA directory under the per-user runtime directory: one with
   SD 1.5's attention shapes (rank 128, fp16), and one for the tiny SD pipeline the workers run;
2. starts `loracache serve` on the default per-user socket, CPU device;
3. starts two separate worker processes that acquire the same LoRA and print a checksum of its
   tensors and their memory (PSS: each pays half of the one shared copy), then each fuses the
   same shared LoRA into its own tiny pipeline and prints a checksum of the image it generates
   (the same in both);
4. prints `loracache stats` (one copy per LoRA, two leases on each) and stops the daemon.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from loracache.shared.endpoints import default_socket_path, user_runtime_dir
from examples.daemon_process import CLI, DaemonProcess
from examples.tiny_models import save, sd_lora_peft, tiny_sd_pipeline

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no notes about optional extras
WORKER_ENV = {**os.environ, "PYTHONPATH": str(HERE.parent)}  # workers import examples.tiny_models


def make_demo_lora(path: Path) -> Path:
    """Attention projections of an SD 1.5 UNet, in diffusers' key format."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    blocks = [("down_blocks.0", 320), ("down_blocks.1", 640), ("down_blocks.2", 1280),
              ("mid_block", 1280), ("up_blocks.1", 1280), ("up_blocks.2", 640),
              ("up_blocks.3", 320)]
    for block, width in blocks:
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                key = f"unet.{block}.attentions.0.transformer_blocks.0.{attn}.{proj}"
                tensors[f"{key}.lora.down.weight"] = (
                    torch.randn(128, width, generator=generator) / width).half()
                tensors[f"{key}.lora.up.weight"] = torch.zeros(width, 128).half() + 0.01
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def main() -> None:
    socket = default_socket_path()
    lora_dir = user_runtime_dir() / "demo-loras"
    lora = make_demo_lora(lora_dir / "ink.safetensors")
    style = save(sd_lora_peft(tiny_sd_pipeline(), rank=4), lora_dir / "tiny-style.safetensors")
    print(f"demo LoRAs: {lora} ({lora.stat().st_size / 2**20:.1f} MiB), {style.name}")
    print(f"starting: loracache serve --lora-dir {lora_dir} --devices cpu  (socket {socket})")
    daemon = DaemonProcess(socket, "--lora-dir", str(lora_dir), "--devices", "cpu",
                           "--log-level", "WARNING")
    try:
        workers = [subprocess.Popen([sys.executable, str(HERE / "demo_worker.py"), str(socket),
                                     lora.name, style.name, name], stdin=subprocess.PIPE,
                                    text=True, stdout=subprocess.PIPE, env=WORKER_ENV)
                   for name in ("worker-1", "worker-2")]
        # Each worker prints two lines (checksum, then image) and then holds its leases.
        lines = [w.stdout.readline() + w.stdout.readline() for w in workers]
        for w in workers:  # both hold their lease: now the shared copy has two users
            w.stdin.write("report\n")
            w.stdin.flush()
        for line, w in zip(lines, workers):
            print(line.rstrip())
            print(w.stdout.readline().rstrip())
        print("\n$ loracache stats")
        subprocess.run([*CLI, "stats"], check=True)
        print("\n$ loracache ls")
        subprocess.run([*CLI, "ls"], check=True)
        for w in workers:
            w.stdin.close()
            w.wait(30)
    finally:
        code = daemon.stop()
    print(f"\ndaemon stopped with exit code {code}; socket removed: {not socket.exists()}")
    sys.exit(code)


if __name__ == "__main__":
    main()
