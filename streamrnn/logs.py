"""structlog set-up: JSON lines for journald, readable colour on a terminal.

Standard-library records (pyzmq's zmq.auth, torch warnings) go through the same
pipeline, so every line of the daemon has one format. Log lifecycle events and
summaries; never a line per token or per update.
"""
from __future__ import annotations

import logging
import sys

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
