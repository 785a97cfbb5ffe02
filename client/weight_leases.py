"""Leases held by model weights: an unfused LoRA's lease stays held while any of the model's
weights is a view of its memory, and is released soon after the last such view goes.

diffusers decides when LoRA weights go (``delete_adapters``, ``unload_lora_weights``, a
pipeline collected, ``pipe.to`` replacing their storage), and garbage collection may run its
callbacks in any thread, even one holding a client lock mid-request. So a callback only wakes
one releaser thread per process, through a queue that is safe to use from such callbacks, and
that thread releases the leases no weight views any more. It also looks every few seconds (a
weight's storage can be replaced without the weight going), and points the weights of a lease
renewed by a restarted daemon at the new copy, so the node keeps one.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import weakref

import torch
from torch import nn

from loracache.shared.errors import LoraCacheError

from .lease import Lease

log = logging.getLogger("loracache.client")

LOOK_INTERVAL = 5.0  # seconds between the releaser's looks when nothing wakes it


def storage_of(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


class WeightLease:
    """A lease and the weights that are views of its memory (by the lease's tensor names)."""

    def __init__(self, lease: Lease, views: dict[str, nn.Parameter]) -> None:
        self.lease = lease
        self.generation, tensors = lease.snapshot()
        self.storage = storage_of(tensors[next(iter(tensors))])
        self.views = {name: weakref.ref(weight) for name, weight in views.items()}
        for weight in views.values():
            weakref.finalize(weight, RELEASER.wake).atexit = False

    def in_use(self) -> bool:
        """Whether a weight still views the lease's memory."""
        return any(weight is not None and storage_of(weight) == self.storage
                   for weight in (ref() for ref in self.views.values()))

    def follow_renewal(self) -> None:
        """Point the weights at the lease's new copy if a restarted daemon renewed it."""
        generation, tensors = self.lease.snapshot()
        if generation == self.generation or not tensors:
            return
        with torch.no_grad():
            for name, ref in self.views.items():
                weight = ref()
                if weight is not None and storage_of(weight) == self.storage:
                    weight.data = tensors[name]
        self.generation, self.storage = generation, storage_of(tensors[next(iter(tensors))])


class Releaser:
    """Releases the leases of :class:`WeightLease` once no weight views them (one thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[WeightLease] = []
        self._signals: queue.SimpleQueue[None] = queue.SimpleQueue()  # reentrant: GC-safe
        self._thread: threading.Thread | None = None
        self._pid = 0

    def hold(self, held: WeightLease) -> None:
        with self._lock:
            self._held.append(held)
            if self._thread is None or self._pid != os.getpid():  # none yet, or forked
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="loracache-releaser",
                                                daemon=True)
                self._thread.start()

    def wake(self) -> None:
        """Ask for a look soon. Safe from garbage collector callbacks in any thread."""
        self._signals.put(None)

    def look(self) -> None:
        """Follow renewals, and release the leases no weight views any more."""
        with self._lock:
            held = list(self._held)
        done = []
        for item in held:
            if not item.lease.released:
                item.follow_renewal()
            if item.lease.released or not item.in_use():
                done.append(item)
        with self._lock:
            self._held = [item for item in self._held if item not in done]
        for item in done:
            try:
                item.lease.release()
            except LoraCacheError as exc:  # the client closed, or the process forked
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
            while not self._signals.empty():  # one look for a burst of collected weights
                self._signals.get_nowait()
            try:
                self.look()
            except Exception:  # the thread must live on: the next look may succeed
                log.exception("looking for leases to release failed")


RELEASER = Releaser()
