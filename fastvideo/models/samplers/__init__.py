"""Flow-matching schedulers (our own implementations; diffusers is only a test oracle)."""

from .base import FlowScheduler, build_scheduler
from .flow_euler import FlowMatchEulerScheduler
from .unipc import FlowUniPCMultistepScheduler

__all__ = [
    "FlowMatchEulerScheduler",
    "FlowScheduler",
    "FlowUniPCMultistepScheduler",
    "build_scheduler",
]
