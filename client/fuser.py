"""The arithmetic of fusing: W += s * (B @ A), in float32, written back in place.

Weights keep their dtype, their Parameter object and their storage (``copy_``), so compiled
graphs, CUDA graphs and optimizer references stay valid. Each update is computed in chunks of
output rows so float32 temporaries stay bounded, and a change of several adapters at once is one
pass and one rounding per weight: W' = W - sum(old terms) + sum(new terms).
"""

from __future__ import annotations

import dataclasses

import torch

CHUNK_BYTES = 32 << 20  # float32 temporaries per chunk of rows


@dataclasses.dataclass(frozen=True)
class Factors:
    """One layer of one adapter: down A (rank x in...), up B (out x rank...), optional alpha."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def scale(self, weight: float) -> float:
        """diffusers/PEFT scaling: weight * alpha / rank, or the weight alone without alpha."""
        return weight * (self.alpha / self.rank if self.alpha is not None else 1.0)

    def fits(self, weight: torch.Tensor) -> bool:
        """Whether B @ A has the shape of ``weight`` (Linear, or Conv2d with a 1x1 up)."""
        return (self.up.shape[0] == weight.shape[0] and self.up[0].numel() == self.rank
                and self.down[0].numel() == weight[0].numel())


Term = tuple[Factors, float]  # factors and the adapter's weight


def update(weight: torch.Tensor, remove: list[Term], add: list[Term],
           base: torch.Tensor | None = None) -> None:
    """Set ``weight`` (in place) to ``base`` (default: itself) - sum(remove) + sum(add)."""
    source = weight if base is None else base
    rows, width = weight.shape[0], weight[0].numel()
    step = max(1, CHUNK_BYTES // (4 * max(width, 1)))
    terms = [(factors, sign * factors.scale(w)) for group, sign in ((remove, -1.0), (add, 1.0))
             for factors, w in group]
    downs = [factors.down.flatten(1).to(weight.device, torch.float32) for factors, _ in terms]
    with torch.no_grad():
        if base is None and weight.dtype == torch.float32 and weight.is_contiguous():
            # Already float32: accumulate straight into the weight, one pass per term and no
            # temporary the size of the weight.
            flat = weight.view(rows, width)
            for (factors, scale), down in zip(terms, downs):
                up = factors.up.flatten(1).to(weight.device, torch.float32)
                flat.addmm_(up, down, alpha=scale)
            return
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            target = weight[start:stop]
            acc = source[start:stop].reshape(stop - start, width).to(
                weight.device, torch.float32, copy=True)
            for (factors, scale), down in zip(terms, downs):
                up = factors.up.flatten(1)[start:stop].to(weight.device, torch.float32)
                acc.addmm_(up, down, alpha=scale)
            target.copy_(acc.view(target.shape))
