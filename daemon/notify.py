"""The sd_notify protocol: tell systemd we are ready, alive, reloading or stopping.

systemd passes ``NOTIFY_SOCKET`` (a datagram socket path, ``@`` for the abstract namespace) and,
with ``WatchdogSec=``, ``WATCHDOG_USEC``. Each notification is one datagram of ``KEY=VALUE``
lines. Without ``NOTIFY_SOCKET`` every call does nothing, so the daemon runs the same anywhere.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping

log = logging.getLogger("loracache.daemon")


class SystemdNotifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if address else None
        usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        for_us = not watchdog_pid or watchdog_pid == str(os.getpid())
        # Ping at half the interval, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) and for_us \
            else None

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, **fields: str | int) -> None:
        """Send one notification; a failure is logged, never raised (systemd may be gone)."""
        if self._socket is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._socket.sendto(message.encode(), self.address)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd >= 253 tell this reload from an earlier one.
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def watchdog(self, status: str) -> None:
        self.send(WATCHDOG=1, STATUS=status)

    def stopping(self) -> None:
        self.send(STOPPING=1, STATUS="stopping")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
