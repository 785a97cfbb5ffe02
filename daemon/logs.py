"""Log lines for people and for journald.

Under systemd (``JOURNAL_STREAM`` names our stderr) each line starts with its syslog priority
(``<3>``, ``<4>``, ...) instead of a timestamp: journald adds the time itself and files the line
under the right priority, so ``journalctl -p warning -u loracache`` works.
"""

from __future__ import annotations

import atexit
import collections
import logging
import logging.handlers
import os
import queue
import sys
import time
from typing import Callable, Hashable

SYSLOG_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4,
                   logging.INFO: 6, logging.DEBUG: 7}


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message``: journald reads the prefix as the line's priority."""

    def format(self, record: logging.LogRecord) -> str:
        # journald reads each line on its own: every line of a traceback gets the priority.
        prefix = f"<{SYSLOG_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def stderr_is_journal() -> bool:
    """Whether stderr is the journal stream systemd connected (not merely inherited by a child)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return f"{stat.st_dev}:{stat.st_ino}" == f"{device}:{inode}"


QUEUE_LINES = 10_000  # log lines held while stderr is slow; beyond them lines are dropped


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread and never waits: when the queue is full (stderr is
    a pipe nobody reads) a record is dropped and counted, and a line saying how many were
    dropped goes out once there is room again. Logging must not stop the event loop."""

    def __init__(self, records: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(records)
        self.records = records
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        if self.dropped and not self.records.full():
            notice = logging.makeLogRecord({
                "name": "loracache.daemon", "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": f"{self.dropped} log line(s) dropped: stderr was not being read"})
            self.dropped = 0
            self.records.put_nowait(self.prepare(notice))
        try:
            self.records.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class BoundedListener(logging.handlers.QueueListener):
    """A QueueListener whose stop at exit waits a bounded time: the queued lines are written
    if stderr takes them within seconds, and a stuck stderr cannot keep the daemon from
    exiting (the standard one waits forever, or fails on a full queue and loses them all)."""

    STOP_SECONDS = 5.0

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        try:
            self.queue.put(self._sentinel, timeout=self.STOP_SECONDS)  # type: ignore[attr-defined]
        except queue.Full:
            return  # stderr is stuck: leave the writer thread (a daemon thread) behind
        thread.join(self.STOP_SECONDS)
        self._thread = None


def configure_logging(level: str) -> None:
    """Send the daemon's logs to stderr at ``level``, formatted for journald when under it,
    from a thread of their own (see :class:`DroppingQueueHandler`)."""
    writer = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        writer.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        writer.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    records: queue.Queue[logging.LogRecord] = queue.Queue(QUEUE_LINES)
    listener = BoundedListener(records, writer)
    listener.start()
    atexit.register(listener.stop)  # what is queued is written before the process ends
    root = logging.getLogger()
    root.handlers[:] = [DroppingQueueHandler(records)]
    set_level(level)


class RateLimitedLog:
    """At most ``burst`` lines per key (who, what) in each ``window`` seconds; past that, a line
    when the window ends says how many were left out (:meth:`flush`, called on a timer, or at
    the key's next line). A client that sends thousands of bad requests gets every error
    reply, and the log gets a few lines about it."""

    KEYS = 1024  # keys remembered at once; the oldest are forgotten first

    def __init__(self, logger: logging.Logger, burst: int = 5, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.burst, self.window, self.clock = logger, burst, window, clock
        self._keys: collections.OrderedDict[Hashable, list[float]] = collections.OrderedDict()

    def info(self, key: Hashable, message: str, *args: object) -> None:
        now = self.clock()
        state = self._keys.get(key)
        if state is None or now - state[0] >= self.window:
            if state is not None:
                self._summarise(key, state, now)
            state = [now, 0, 0]  # window start, lines logged, lines left out
            self._keys[key] = state
            self._keys.move_to_end(key)
            while len(self._keys) > self.KEYS:
                oldest, dropped = self._keys.popitem(last=False)
                self._summarise(oldest, dropped, now)
        if state[1] < self.burst:
            state[1] += 1
            self.logger.info(message, *args)
        else:
            state[2] += 1

    def flush(self) -> None:
        """Report and forget the keys whose window has ended."""
        now = self.clock()
        for key in [k for k, state in self._keys.items() if now - state[0] >= self.window]:
            self._summarise(key, self._keys.pop(key), now)

    def _summarise(self, key: Hashable, state: list[float], now: float) -> None:
        if state[2]:
            self.logger.info("%d more lines like the last for %s in %.0f s were not logged",
                             state[2], key, now - state[0])


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
