"""Log formatting for journald: each line carries its syslog priority."""

from __future__ import annotations

import logging
import queue

from loracache.daemon.logs import DroppingQueueHandler, JournalFormatter, RateLimitedLog


def test_every_line_of_a_traceback_carries_the_priority() -> None:
    """journald reads lines one by one: a traceback's lines must all say "error"."""
    try:
        raise ValueError("boom")
    except ValueError as exc:
        record = logging.LogRecord("loracache.daemon", logging.ERROR, __file__, 1,
                                   "load failed", None, (type(exc), exc, exc.__traceback__))
    lines = JournalFormatter("%(name)s: %(message)s").format(record).splitlines()
    assert lines[0] == "<3>loracache.daemon: load failed"
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>ValueError: boom"


def test_repeated_lines_are_limited_per_key_and_counted() -> None:
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("test.ratelimit")
    logger.propagate, logger.level = False, logging.INFO
    logger.handlers[:] = [Collect()]
    now = [0.0]
    limited = RateLimitedLog(logger, burst=2, window=10.0, clock=lambda: now[0])
    for i in range(5):
        limited.info(("peer-a", "BAD_REQUEST"), "bad %d", i)
    limited.info(("peer-b", "BAD_REQUEST"), "other")  # another key has its own allowance
    assert lines == ["bad 0", "bad 1", "other"]
    now[0] = 10.0
    limited.info(("peer-a", "BAD_REQUEST"), "bad %d", 5)
    assert lines[3:] == ["3 more lines like the last for ('peer-a', 'BAD_REQUEST') in 10 s "
                         "were not logged", "bad 5"]
    for i in range(3):  # a burst, then silence: the count comes at the end of the window
        limited.info(("peer-b", "NOT_FOUND"), "gone %d", i)
    now[0] = 25.0
    limited.flush()
    assert lines[-1] == ("1 more lines like the last for ('peer-b', 'NOT_FOUND') in 15 s "
                         "were not logged")


def test_a_full_queue_drops_lines_and_says_so_later() -> None:
    records: queue.Queue[logging.LogRecord] = queue.Queue(2)
    handler = DroppingQueueHandler(records)
    for i in range(5):  # nobody writes: the queue fills, and the call never blocks
        handler.handle(logging.makeLogRecord({"msg": f"line {i}", "levelno": logging.INFO}))
    assert handler.dropped == 3
    assert [records.get_nowait().getMessage() for _ in range(2)] == ["line 0", "line 1"]
    handler.handle(logging.makeLogRecord({"msg": "line 5", "levelno": logging.INFO}))
    assert [records.get_nowait().getMessage() for _ in range(2)] == [
        "3 log line(s) dropped: stderr was not being read", "line 5"]
