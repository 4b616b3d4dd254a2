"""fastvideo: fast, simple video diffusion on every GPU of a machine from one Python call."""

from fastvideo.engine.configs import PipelineConfig, SamplingParam, VAEConfig
from fastvideo.engine.generator import VideoGenerator
from fastvideo.engine.output import VideoOutput
from fastvideo.models.demo import DEMO_MODEL_ID
from fastvideo.workers.executor import EngineDeadError, RequestFailedError

__version__ = "0.1.0"

__all__ = [
    "DEMO_MODEL_ID",
    "EngineDeadError",
    "PipelineConfig",
    "RequestFailedError",
    "SamplingParam",
    "VAEConfig",
    "VideoGenerator",
    "VideoOutput",
]
