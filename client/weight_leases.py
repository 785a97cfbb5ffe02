"""Leases held by model weights: an unfused LoRA's lease stays held while any of the model's
LoRA layers has a weight that is a view of its memory, and is released soon after none has.

diffusers decides when LoRA layers go (``delete_adapters``, ``unload_lora_weights``, a
pipeline collected) and ``pipe.to`` may give their weights new storage; garbage collection runs
its callbacks in any thread, even one holding a client lock mid-request. So a callback only
wakes one releaser thread per process, through a queue that is safe to use from such
callbacks, and that thread releases the leases no weight views any more; it also looks every
few seconds. It never changes a weight: pointing the weights of a lease renewed by a
restarted daemon at the new copy is done on the caller's thread (:meth:`Releaser.look` with
``follow_renewals``), under the same lock as every look, so a weight is never moved while a
look decides that its lease is unused.

The layers are held weakly, not their weights: a weak reference on a tensor would stop
``torch.utils.swap_tensors``, which module conversions and PEFT's hotswap use.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import weakref
from collections.abc import Mapping
from typing import cast

import torch
from torch import nn

from loracache.shared.errors import LoraCacheError

from .lease import Lease

log = logging.getLogger("loracache.client")

LOOK_INTERVAL = 5.0  # seconds between the releaser's looks when nothing wakes it


def storage_of(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def weight_of(layer: nn.Module) -> torch.Tensor:
    """A LoRA factor layer's weight (a Linear's or a Conv's)."""
    return cast(torch.Tensor, layer.weight)


class WeightLease:
    """A lease and the LoRA layers whose weights are views of its memory (by tensor name)."""

    def __init__(self, lease: Lease, generation: int, tensors: Mapping[str, torch.Tensor],
                 layers: dict[str, nn.Module]) -> None:
        self.lease = lease
        self.generation = generation  # of the lease when ``tensors`` were taken from it
        self.storage = storage_of(tensors[next(iter(tensors))])
        self.layers = {name: weakref.ref(layer) for name, layer in layers.items()}
        for layer in layers.values():
            weakref.finalize(layer, RELEASER.wake).atexit = False

    def weights(self) -> list[tuple[str, torch.Tensor]]:
        alive = ((name, ref()) for name, ref in self.layers.items())
        return [(name, weight_of(layer)) for name, layer in alive if layer is not None]

    def in_use(self) -> bool:
        """Whether a weight still views the lease's memory."""
        return any(storage_of(weight) == self.storage for _, weight in self.weights())

    def follow_renewal(self) -> None:
        """Point the weights at the lease's new copy if a restarted daemon renewed it."""
        generation, tensors = self.lease.snapshot()
        if generation == self.generation or not tensors:
            return
        with torch.no_grad():
            for name, weight in self.weights():
                if storage_of(weight) == self.storage:
                    weight.data = tensors[name]
        self.generation, self.storage = generation, storage_of(tensors[next(iter(tensors))])


class Releaser:
    """Releases the leases of :class:`WeightLease` once no weight views them (one thread)."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # the parent's thread is not here

    def _reset(self) -> None:
        self._lock = threading.RLock()  # held by each look: weights never move mid-look
        self._held: list[WeightLease] = []
        self._signals: queue.SimpleQueue[None] = queue.SimpleQueue()  # reentrant: GC-safe
        self._thread: threading.Thread | None = None

    def hold(self, held: WeightLease) -> None:
        with self._lock:
            self._held.append(held)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="loracache-releaser",
                                                daemon=True)
                self._thread.start()

    def wake(self) -> None:
        """Ask for a look soon. Safe from garbage collector callbacks in any thread."""
        self._signals.put(None)

    def look(self, follow_renewals: bool = False) -> None:
        """Release the leases no weight views any more; first, with ``follow_renewals`` (only
        on the thread that uses the model), point weights at their leases' renewed copies."""
        with self._lock:
            done = []
            for item in self._held:
                if follow_renewals and not item.lease.released:
                    item.follow_renewal()
                if item.lease.released or not item.in_use():
                    done.append(item)
            self._held = [item for item in self._held if item not in done]
            for item in done:
                try:
                    item.lease.release()
                except LoraCacheError as exc:  # the client closed meanwhile
                    log.debug("releasing %s failed: %s", item.lease, exc)

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def _run(self) -> None:
        while True:
            try:
                self._signals.get(timeout=LOOK_INTERVAL)
            except queue.Empty:
                pass
            while not self._signals.empty():  # one look for a burst of collected layers
                self._signals.get_nowait()
            try:
                self.look()
            except Exception:  # the thread must live on: the next look may succeed
                log.exception("looking for leases to release failed")


RELEASER = Releaser()
