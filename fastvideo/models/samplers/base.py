"""Common interface of the flow-matching schedulers and a factory for diffusers-style configs.

A flow-matching model predicts the velocity ``v = noise - x0`` of the straight path
``x_sigma = (1 - sigma) * x0 + sigma * noise``. A scheduler owns the sigma schedule (from
1 towards 0) and turns each velocity prediction into the sample at the next, lower sigma.

fastvideo never imports diffusers at runtime; diffusers is only the oracle our tests compare
against, so configs are accepted under diffusers' class and field names.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

SigmaArray = TypeVar("SigmaArray", np.ndarray, Tensor)


class FlowScheduler(ABC):
    """A flow-matching sampler that keeps its own step counter.

    Usage::

        scheduler.set_timesteps(num_steps, device)
        for t in scheduler.timesteps:
            velocity = model(sample, t)
            sample = scheduler.step(velocity, sample)

    Attributes:
        timesteps: ``[num_inference_steps]`` on the device given to ``set_timesteps``; what the
            model is conditioned on at each step (dtype as diffusers exposes it per scheduler).
        sigmas: ``[num_inference_steps + 1]`` float32 on the CPU; ``sigmas[i]`` is the noise
            level of the sample passed to the ``i``-th ``step`` and ``sigmas[-1]`` the level
            of the final output.
        order: model evaluations per ``step`` (1 for both our schedulers; this is what
            diffusers' ``scheduler.order`` means, not the solver's order of accuracy).
    """

    order: int = 1

    def __init__(self, num_train_timesteps: int) -> None:
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(
                f"{type(self).__name__}: num_train_timesteps must be a positive int, "
                f"got {num_train_timesteps!r}"
            )
        self.num_train_timesteps = num_train_timesteps
        self.timesteps: Tensor = torch.empty(0)
        self.sigmas: Tensor = torch.empty(0)
        # None until set_timesteps: stepping an unset schedule is a caller bug, not a no-op.
        self._step_index: int | None = None

    @property
    def num_inference_steps(self) -> int:
        """Number of steps of the current schedule (0 before ``set_timesteps``)."""
        return len(self.timesteps)

    @property
    def step_index(self) -> int | None:
        """Index of the next ``step`` call in the schedule, or None before ``set_timesteps``."""
        return self._step_index

    @abstractmethod
    def set_timesteps(self, num_inference_steps: int, device: torch.device | str = "cpu") -> None:
        """Build the schedule for ``num_inference_steps`` steps and reset the stepping state."""

    @abstractmethod
    def step(self, model_output: Tensor, sample: Tensor) -> Tensor:
        """Advance ``sample`` [B, ...] by one step given the velocity ``model_output`` [B, ...].

        Returns the sample at the next (lower) sigma, with ``sample``'s dtype and shape.
        """

    def select_batch(self, index: Tensor) -> None:
        """Keep only batch items ``index`` (a 1-D LongTensor) in any per-sample state, when
        requests leave a running batch (aborted, failed). Stateless schedulers do nothing."""
        return None

    @staticmethod
    def _check_num_steps(num_inference_steps: int) -> None:
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(
                f"num_inference_steps must be a positive int, got {num_inference_steps!r}"
            )

    def _next_step_index(self) -> int:
        """Return the index of the step being taken, or raise if there is none left."""
        if self._step_index is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps() before step()")
        if self._step_index >= self.num_inference_steps:
            raise RuntimeError(
                f"{type(self).__name__}: all {self.num_inference_steps} steps were already taken; "
                "call set_timesteps() to start a new schedule"
            )
        return self._step_index


def shift_flow_sigmas(sigmas: SigmaArray, shift: float) -> SigmaArray:
    """Static timestep shift ``s' = shift * s / (1 + (shift - 1) * s)``; shift > 1 spends more
    steps at high noise. Works elementwise on numpy arrays and tensors, in their own precision
    (the callers rely on that to reproduce diffusers' rounding)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def require(ok: bool, owner: str, field: str, value: Any, supported: str) -> None:
    """Raise a ValueError naming ``owner`` and the config ``field`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{owner}: config field {field}={value!r} is not supported ({supported})")


# Fields whose default in our classes differs from diffusers'. A diffusers config that omits
# them means diffusers' default, so a bare {"_class_name": "UniPCMultistepScheduler"} is an
# epsilon-prediction scheduler and must be rejected rather than silently run as flow matching.
_DIFFUSERS_DEFAULTS: dict[str, dict[str, Any]] = {
    "UniPCMultistepScheduler": {"prediction_type": "epsilon", "use_flow_sigmas": False},
    "FlowMatchEulerDiscreteScheduler": {},
}
_SHORT_NAMES = {"unipc": "UniPCMultistepScheduler", "euler": "FlowMatchEulerDiscreteScheduler"}


def build_scheduler(
    class_name: str, config: dict[str, Any], flow_shift: float | None = None
) -> FlowScheduler:
    """Build our scheduler from a diffusers ``scheduler_config.json``-style dict.

    Args:
        class_name: diffusers' ``_class_name`` ("UniPCMultistepScheduler" or
            "FlowMatchEulerDiscreteScheduler"), or the short names "unipc" / "euler", which
            take our own defaults (flow prediction) for the fields the config leaves out.
        config: constructor fields under diffusers' names; keys starting with '_' are ignored.
        flow_shift: if given, overrides ``flow_shift`` (UniPC) or ``shift`` (Euler).

    Raises:
        ValueError: unknown class name, unknown config field, or a field value we do not
            implement (the message names the class and the field).
    """
    # Imported here because those modules import this one for FlowScheduler.
    from .flow_euler import FlowMatchEulerScheduler
    from .unipc import FlowUniPCMultistepScheduler

    classes: dict[str, tuple[type[FlowScheduler], str]] = {
        "UniPCMultistepScheduler": (FlowUniPCMultistepScheduler, "flow_shift"),
        "FlowMatchEulerDiscreteScheduler": (FlowMatchEulerScheduler, "shift"),
    }
    diffusers_name = _SHORT_NAMES.get(class_name, class_name)
    if diffusers_name not in classes:
        raise ValueError(
            f"unsupported scheduler class {class_name!r}; supported: "
            f"{sorted(classes)} or the short names {sorted(_SHORT_NAMES)}"
        )
    cls, shift_field = classes[diffusers_name]

    kwargs = {} if class_name in _SHORT_NAMES else dict(_DIFFUSERS_DEFAULTS[diffusers_name])
    kwargs.update({k: v for k, v in config.items() if not k.startswith("_")})
    if flow_shift is not None:
        kwargs[shift_field] = flow_shift

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"{diffusers_name}: unsupported config field(s) {unknown}")
    return cls(**kwargs)
