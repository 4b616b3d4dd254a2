"""Logging set-up: one ``fastvideo`` logger tree, lazy ``%s`` formatting.

Records propagate to the application's handlers. Until the application configures logging
(the root logger has no handlers), a fallback handler prints them to stderr, so a script
that sets nothing still sees the engine's lines, and one that does sees them once, in its
own format. ``FASTVIDEO_LOGGING_HANDLER=0`` turns the fallback off.
"""

from __future__ import annotations

import logging
import sys

from fastvideo import envs

_FORMAT = "%(levelname)s %(asctime)s [%(name)s] %(message)s"
_configured = False


class _FallbackHandler(logging.StreamHandler):
    """Prints only while the application has configured no logging of its own."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def _configure_root() -> None:
    global _configured
    if _configured:
        return
    _configured = True
    root = logging.getLogger("fastvideo")
    root.setLevel(envs.logging_level())
    if envs.logging_handler() and not any(isinstance(h, _FallbackHandler) for h in root.handlers):
        handler = _FallbackHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
    root.propagate = True


def init_logger(name: str) -> logging.Logger:
    """Return the logger for module ``name`` (a child of the ``fastvideo`` logger)."""
    _configure_root()
    return logging.getLogger(name)
