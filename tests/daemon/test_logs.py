"""Log formatting for journald: each line carries its syslog priority."""

from __future__ import annotations

import logging

from loracache.daemon.logs import JournalFormatter


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
