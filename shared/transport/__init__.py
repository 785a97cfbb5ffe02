"""Buffer transports: how one entry's packed buffer is allocated, filled, lent and mapped.

The daemon side (:class:`~.base.Transport`, :class:`~.base.DeviceBuffer`) allocates and fills
buffers and exports a handle per lease; the client side (:func:`open_handle`) maps a handle to
a uint8 tensor without copying. Nothing outside this package branches on the device kind.
"""

from .base import (PROBE_BYTES, DeviceBuffer, Segment, Transport, discard_handle, open_handle,
                   probe_pattern)

__all__ = ["PROBE_BYTES", "DeviceBuffer", "Segment", "Transport", "discard_handle", "open_handle",
           "probe_pattern"]
