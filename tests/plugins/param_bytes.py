"""Test-only worker plugin: at the first denoising step boundary each rank writes how many
bytes of DiT weights it holds (``fastvideo.layers.sharded.parameter_bytes``) to
``$FASTVIDEO_TEST_PARAM_BYTES_DIR/rank<N>.json``. Loaded by the workers through
FASTVIDEO_WORKER_PLUGINS=tests.plugins.param_bytes."""

from __future__ import annotations

import json
import os
from pathlib import Path


def register(worker) -> None:
    from fastvideo.layers.sharded import parameter_bytes

    out = Path(os.environ["FASTVIDEO_TEST_PARAM_BYTES_DIR"])

    def record(batch, step: int) -> None:
        if step != 0:
            return
        dit = worker.pipeline.components["transformer"]
        sharded = getattr(dit, "_fastvideo_sharded", None)
        facts = {
            "dit_bytes": parameter_bytes(dit),
            "shard_bytes": sharded.shard_bytes if sharded is not None else 0,
            "block_bytes": sum(
                p.numel() * p.element_size() for b in dit.blocks for p in b.parameters()
            ),
        }
        (out / f"rank{worker.rank}.json").write_text(json.dumps(facts))

    worker.step_hooks.append(record)
