"""Test-only worker plugin: the latents of items whose prompt contains ``POISON`` turn NaN
at step 1 (exercises per-request failure isolation). Loaded by the workers through
FASTVIDEO_WORKER_PLUGINS=tests.plugins.nan_fault."""

from __future__ import annotations

MARKER = "POISON"


def register(worker) -> None:
    def poison(batch, step: int) -> None:
        if step != 1 or batch.latents is None:
            return
        for i, item in enumerate(batch.items):
            if MARKER in item.prompt:
                batch.latents[i] = float("nan")

    worker.step_hooks.append(poison)
