"""structlog set-up: JSON lines for journald, readable colour on a terminal.

Standard-library records (pyzmq's zmq.auth, torch warnings) go through the same
pipeline, so every line of the daemon has one format. Log lifecycle events and
summaries; never a line per token or per update.
"""
from __future__ import annotations

import logging
import sys
import time
from collections import Counter

import structlog


def configure(format: str = "auto", level: str = "info", stream=None) -> None:
    stream = stream or sys.stdout
    console = format == "console" or (format == "auto" and stream.isatty())
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (structlog.dev.ConsoleRenderer() if console
                else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    *([] if console else [structlog.processors.dict_tracebacks]),
                    renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def get(name: str = "streamrnn"):
    return structlog.get_logger(name)


class Bursts:
    """Counts events by kind and logs them as one line per `seconds` at most: a flood of
    bad input costs one log line, not one per message."""

    def __init__(self, log, event: str, seconds: float = 10.0):
        self.log, self.event, self.seconds = log, event, seconds
        self.counts: Counter[str] = Counter()
        self.example = ""
        self.next_line = 0.0

    def add(self, kind: str, example: str, count: int = 1) -> None:
        self.counts[kind] += count
        self.example = example

    def emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.counts and (force or now >= self.next_line):
            self.log.warning(self.event, counts=dict(self.counts), example=self.example)
            self.counts.clear()
            self.next_line = now + self.seconds
