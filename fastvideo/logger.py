"""Logging set-up: one ``fastvideo`` logger tree, configured once, lazy ``%s`` formatting."""

from __future__ import annotations

import logging
import sys

from fastvideo import envs

_FORMAT = "%(levelname)s %(asctime)s [%(name)s] %(message)s"
_configured = False


def _configure_root() -> None:
    global _configured
    if _configured:
        return
    _configured = True
    root = logging.getLogger("fastvideo")
    root.setLevel(envs.logging_level())
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
    root.propagate = False


def init_logger(name: str) -> logging.Logger:
    """Return the logger for module ``name`` (a child of the ``fastvideo`` logger)."""
    _configure_root()
    return logging.getLogger(name)
