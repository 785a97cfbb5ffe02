"""The safetensors dtype names we accept, with their torch dtype and item size."""

from __future__ import annotations

import torch

# The whitelist: every dtype a LoRA file plausibly holds. Anything else is INVALID_LORA.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

ITEM_SIZES: dict[str, int] = {name: dtype.itemsize for name, dtype in TORCH_DTYPES.items()}

SAFETENSORS_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}
