"""Log lines for people and for journald.

Under systemd (``JOURNAL_STREAM`` names our stderr) each line starts with its syslog priority
(``<3>``, ``<4>``, ...) instead of a timestamp: journald adds the time itself and files the line
under the right priority, so ``journalctl -p warning -u loracache`` works.
"""

from __future__ import annotations

import logging
import os
import sys

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


def configure_logging(level: str) -> None:
    """Send the daemon's logs to stderr at ``level``, formatted for journald when under it."""
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
