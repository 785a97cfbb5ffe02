"""Finding the layer a LoRA key names, in module trees as users build them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loracache.client.pipelines import fusable_module


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own, on import
def test_layers_are_found_through_compiled_and_peft_wrapped_submodules() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_q = nn.Linear(4, 4)

    class Wrapped(nn.Module):  # as PEFT wraps a layer: the weight stays on base_layer
        def __init__(self, base: nn.Module) -> None:
            super().__init__()
            self.base_layer = base

    root = nn.Module()
    root.blocks = nn.ModuleList([Attention(), Attention()])
    root.blocks[1] = torch.compile(root.blocks[1])  # forwards attribute lookups to the original
    root.proj = Wrapped(nn.Conv2d(4, 4, 1))
    assert fusable_module(root, "blocks.0.to_q") is root.blocks[0].to_q
    assert fusable_module(root, "blocks.1.to_q") is root.blocks[1]._orig_mod.to_q
    assert fusable_module(root, "proj") is root.proj.base_layer
    assert fusable_module(root, "blocks.2.to_q") is None
    assert fusable_module(root, "blocks.0") is None  # not a Linear or Conv2d
