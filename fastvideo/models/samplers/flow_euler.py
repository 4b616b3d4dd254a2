"""First-order (Euler) sampler for flow-matching models.

Reproduces diffusers' ``FlowMatchEulerDiscreteScheduler`` with its default options and a
static ``shift``, including a quirk worth knowing: the shift is applied twice. The training
schedule ``sigma = t / N_train`` (t = N_train..1) is shifted once when the scheduler is built,
the inference schedule is a linspace between that schedule's ends, and that linspace is
shifted again. So the last nonzero sigma is ``shift(shift(1 / N_train))``, not
``shift(1 / N_train)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import FlowScheduler, require, shift_flow_sigmas

_OWNER = "FlowMatchEulerDiscreteScheduler"


class FlowMatchEulerScheduler(FlowScheduler):
    """Euler steps ``x_next = x + (sigma_next - sigma) * v`` on a statically shifted schedule.

    Keyword arguments carry diffusers' config names so a diffusers config loads as is.

    Args:
        num_train_timesteps: N_train; ``timesteps = sigmas * N_train`` (float32).
        shift: static shift of the sigma schedule.
        use_dynamic_shifting, invert_sigmas, use_karras_sigmas, use_exponential_sigmas,
            use_beta_sigmas, stochastic_sampling: must be False. shift_terminal: must be None.
        base_shift, max_shift, base_image_seq_len, max_image_seq_len, time_shift_type: only
            used by dynamic shifting; ignored.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ) -> None:
        super().__init__(num_train_timesteps)
        for field, value in (
            ("use_dynamic_shifting", use_dynamic_shifting),
            ("invert_sigmas", invert_sigmas),
            ("use_karras_sigmas", use_karras_sigmas),
            ("use_exponential_sigmas", use_exponential_sigmas),
            ("use_beta_sigmas", use_beta_sigmas),
            ("stochastic_sampling", stochastic_sampling),
        ):
            require(value is False, _OWNER, field, value, "only False")
        require(not shift_terminal, _OWNER, "shift_terminal", shift_terminal, "only None")
        ok_shift = isinstance(shift, int | float) and not isinstance(shift, bool) and shift > 0
        require(ok_shift, _OWNER, "shift", shift, "a positive number")
        self.shift = float(shift)

        # Ends of the shifted training schedule, in float32 torch like diffusers' constructor:
        # their float32 rounding carries into every inference schedule.
        ends = torch.tensor([num_train_timesteps, 1], dtype=torch.float32) / num_train_timesteps
        self._sigma_max, self._sigma_min = shift_flow_sigmas(ends, shift).tolist()

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str = "cpu") -> None:
        """Build the schedule.

        sigmas: a float64 linspace between the shifted training schedule's ends, shifted again,
        rounded to float32, with a final 0: [steps + 1] on the CPU. timesteps:
        ``sigmas[:-1] * N_train`` in float32, [steps] on ``device``.
        """
        self._check_num_steps(num_inference_steps)
        n_train = self.num_train_timesteps
        # float64 numpy like diffusers, so every float32 sigma rounds the same way.
        ts = np.linspace(self._sigma_max * n_train, self._sigma_min * n_train, num_inference_steps)
        sigmas = torch.from_numpy(shift_flow_sigmas(ts / n_train, self.shift)).to(torch.float32)
        self.timesteps = (sigmas * n_train).to(device)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self._step_index = 0

    def step(self, model_output: Tensor, sample: Tensor) -> Tensor:
        """One Euler step.

        Args:
            model_output: predicted velocity [B, ...] at ``sigmas[step_index]``, any float dtype.
            sample: current sample [B, ...] (any layout, e.g. [B, C, T, H, W] or [B, L, C]).

        Returns:
            ``sample + (sigma_next - sigma) * model_output``, accumulated in float32 and cast to
            ``sample``'s dtype. (diffusers casts to ``model_output``'s dtype instead, which would
            round an fp32 latent to bf16 every step; the values are otherwise identical.)
        """
        index = self._next_step_index()
        # dt goes to the output's device like diffusers' on-device sigmas: a CPU scalar would
        # keep fp32 in a bf16 GPU product, an on-device one is rounded to bf16 first.
        dt = (self.sigmas[index + 1] - self.sigmas[index]).to(model_output.device)
        prev_sample = sample.to(torch.float32) + dt * model_output
        self._step_index = index + 1
        return prev_sample.to(sample.dtype)
