"""fastvideo: fast, simple video diffusion on every GPU of a machine from one Python call."""

from fastvideo.engine.async_engine import AsyncVideoEngine, run
from fastvideo.engine.configs import PipelineConfig, SamplingParam, VAEConfig
from fastvideo.engine.core import ProgressEvent, RequestAbortedError
from fastvideo.engine.generator import VideoGenerator
from fastvideo.engine.output import VideoOutput
from fastvideo.models.demo import DEMO_MODEL_ID
from fastvideo.scheduler import QueueFullError
from fastvideo.workers.executor import EngineDeadError, RequestFailedError

__version__ = "0.1.0"

__all__ = [
    "AsyncVideoEngine",
    "DEMO_MODEL_ID",
    "EngineDeadError",
    "PipelineConfig",
    "ProgressEvent",
    "QueueFullError",
    "RequestAbortedError",
    "RequestFailedError",
    "SamplingParam",
    "VAEConfig",
    "VideoGenerator",
    "VideoOutput",
    "run",
]
