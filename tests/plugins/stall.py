"""Test-only worker plugin: a batch whose prompt contains ``STALL`` hangs at step 2 (the
main loop blocks as in a kernel or collective that never returns; heartbeats go on)."""

from __future__ import annotations

import time

MARKER = "STALL"


def register(worker) -> None:
    def stall(batch, step: int) -> None:
        if step == 2 and any(MARKER in item.prompt for item in batch.items):
            time.sleep(3600)

    worker.step_hooks.append(stall)
