"""The arithmetic of fusing: W += s * (B @ A), in float32, written back in place.

Weights keep their dtype, their Parameter object and their storage (``copy_``), so compiled
graphs, CUDA graphs and optimizer references stay valid. Each update is computed in chunks of
output rows so float32 temporaries stay bounded, and a change of several adapters at once is one
pass and one rounding per weight: W' = W - sum(old terms) + sum(new terms).
"""

from __future__ import annotations

import dataclasses
import math

import torch

CHUNK_BYTES = 32 << 20  # float32 temporaries per chunk of rows


@dataclasses.dataclass(frozen=True)
class Factors:
    """One layer of one adapter: down A (rank x in...), up B (out x rank...), optional alpha."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None
    # The factors as matrices (convolutions' flattened), made once: every fuse uses them.
    down2d: torch.Tensor = dataclasses.field(init=False, repr=False, compare=False)
    up2d: torch.Tensor = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "down2d", self.down.reshape(self.down.shape[0], -1))
        object.__setattr__(self, "up2d", self.up.reshape(self.up.shape[0], -1))

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def scale(self, weight: float) -> float:
        """diffusers/PEFT scaling: weight * alpha / rank, or the weight alone without alpha."""
        return weight * (self.alpha / self.rank if self.alpha is not None else 1.0)

    def fits(self, weight: torch.Tensor) -> bool:
        """Whether B @ A has the shape of ``weight`` (Linear, or Conv2d with a 1x1 up)."""
        return (self.up.shape[0] == weight.shape[0] and math.prod(self.up.shape[1:]) == self.rank
                and math.prod(self.down.shape[1:]) == math.prod(weight.shape[1:]))


Term = tuple[Factors, float]  # factors and the adapter's weight


def update(weight: torch.Tensor, remove: list[Term], add: list[Term],
           base: torch.Tensor | None = None) -> None:
    """Set ``weight`` (in place) to ``base`` (default: itself) - sum(remove) + sum(add).

    Each step is one tensor operation on the whole weight where it fits in one chunk (every
    LoRA-trained layer of the usual UNets and transformers): on a GPU the cost of a small
    layer's fuse is the number of operations launched, not their arithmetic.
    """
    source = weight if base is None else base
    rows = weight.shape[0]
    width = weight.numel() // rows if rows else 0
    terms = [(factors, sign * factors.scale(w)) for group, sign in ((remove, -1.0), (add, 1.0))
             for factors, w in group]
    device = weight.device
    with torch.no_grad():
        if base is None and weight.dtype == torch.float32 and weight.is_contiguous():
            # Already float32: accumulate straight into the weight, one pass per term and no
            # temporary the size of the weight.
            flat = weight.view(rows, width)
            for factors, scale in terms:
                flat.addmm_(factors.up2d.to(device, torch.float32),
                            factors.down2d.to(device, torch.float32), alpha=scale)
            return
        step = max(1, CHUNK_BYTES // (4 * max(width, 1)))
        downs = [factors.down2d.to(device, torch.float32) for factors, _ in terms]
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            whole = start == 0 and stop == rows
            target = weight if whole else weight[start:stop]
            acc = (source if whole else source[start:stop]).reshape(stop - start, width).to(
                device, torch.float32, copy=True)
            for (factors, scale), down in zip(terms, downs):
                up = factors.up2d if whole else factors.up2d[start:stop]
                acc.addmm_(up.to(device, torch.float32), down, alpha=scale)
            target.copy_(acc.view(target.shape))
