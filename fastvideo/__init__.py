"""fastvideo: fast, simple video diffusion on every GPU of a machine from one Python call.

Exports are lazy (module ``__getattr__``), so importing a light subpackage such as
``fastvideo.scheduler`` pulls in neither torch nor the engine.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# name -> module that defines it
_EXPORTS = {
    "AsyncVideoEngine": "fastvideo.entrypoints.async_engine",
    "run": "fastvideo.entrypoints.async_engine",
    "VideoGenerator": "fastvideo.entrypoints.generator",
    "PipelineConfig": "fastvideo.config",
    "SamplingParam": "fastvideo.config",
    "VAEConfig": "fastvideo.config",
    "ProgressEvent": "fastvideo.engine.core",
    "VideoOutput": "fastvideo.engine.output",
    "QueueFullError": "fastvideo.scheduler",
    "EngineDeadError": "fastvideo.wire.errors",
    "RequestFailedError": "fastvideo.wire.errors",
    "RequestAbortedError": "fastvideo.wire.errors",
    "RequestTimeoutError": "fastvideo.wire.errors",
    "WorkerStartupError": "fastvideo.wire.errors",
    "OutputSaveError": "fastvideo.wire.errors",
}

__all__ = sorted([*_EXPORTS, "DEMO_MODEL_ID"])


def __getattr__(name: str) -> Any:
    if name == "DEMO_MODEL_ID":  # the registry's default demo model
        from fastvideo.models.registry import default_demo_id

        return default_demo_id()
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastvideo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
