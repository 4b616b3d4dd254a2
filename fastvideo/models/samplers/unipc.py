"""UniPC multistep sampler for flow-matching models (the Wan2.1 default scheduler).

UniPC (Zhao et al., 2023, https://arxiv.org/abs/2302.04867) is a multistep exponential
integrator in the half-log-SNR ``lambda = log(alpha / sigma)``. With flow sigmas,
``alpha = 1 - sigma``. Every step:

1. converts the velocity to a data prediction ``x0 = sample - sigma * v``;
2. (UniC) re-does the previous step with the now-known ``x0`` at its end point, which
   corrects the sample the previous predictor produced, at no extra model call;
3. (UniP) extrapolates from the last ``order`` data predictions to the next sigma.

Only the configuration diffusers uses for flow-matching checkpoints is implemented
(``prediction_type="flow_prediction"``, ``use_flow_sigmas=True``, ``predict_x0=True``), and it
reproduces diffusers' ``UniPCMultistepScheduler`` bit for bit in fp32: the schedule is computed
in float64 numpy like diffusers, and the update keeps diffusers' operation order and the
devices of its scalar operands (both decide the fp32/bf16 rounding). One deliberate
difference: with ``solver_type="bh1"`` and a final sigma of 0, diffusers' last step returns NaN
(it multiplies B(h) = -inf by an absent, zero correction term); ours returns the exact limit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .base import FlowScheduler, require, shift_flow_sigmas

_OWNER = "UniPCMultistepScheduler"


def _half_log_snr(sigma: Tensor) -> Tensor:
    """``lambda = log(alpha) - log(sigma)`` with flow ``alpha = 1 - sigma`` (0-dim tensors)."""
    return torch.log(1 - sigma) - torch.log(sigma)


def _phi_rhs(hh: Tensor, h_phi_1: Tensor, b_h: Tensor, order: int) -> list[Tensor]:
    """Right-hand sides ``b_i = i! * hh * phi_{i+1}(hh) / B(h)`` for i = 1..order.

    ``phi_1(x) = (e^x - 1) / x`` and ``phi_{k+1}(x) = (phi_k(x) - 1/k!) / x``; the running value
    ``h_phi_k`` holds ``hh * phi_{k+1}(hh)``. All operands are 0-dim tensors.
    """
    rhs = []
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    for i in range(1, order + 1):
        rhs.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    return rhs


class FlowUniPCMultistepScheduler(FlowScheduler):
    """UniPC with UniP-B(h) predictor and UniC-B(h) corrector on flow-matching sigmas.

    Keyword arguments carry diffusers' config names. The fields listed as ignored have no
    effect on the flow-sigma path in diffusers either; they are accepted so a diffusers
    ``scheduler_config.json`` loads as is. Anything that would change the math in a way we do
    not implement raises a ValueError naming the field.

    Args:
        num_train_timesteps: N_train; ``timesteps = int(sigmas * N_train)``.
        solver_order: multistep order of the predictor, 1..3 (Wan2.1: 2).
        prediction_type: must be "flow_prediction" (the model predicts velocity).
        use_flow_sigmas: must be True.
        flow_shift: static shift of the sigma schedule (Wan2.1: 3.0 for 480p, 5.0 for 720p).
        predict_x0: must be True (the update runs on data predictions).
        solver_type: "bh1" (B(h) = h) or "bh2" (B(h) = e^h - 1); diffusers' legacy aliases
            "midpoint", "heun", "logrho" mean "bh2".
        lower_order_final: use lower orders for the last steps. The last step has an
            infinite (final sigma 0) or zero ("sigma_min") step size, so False is accepted
            only where that stays finite: solver_order 1, or 2 with "sigma_min".
        disable_corrector: step indices ``i`` such that the corrector is skipped at step i + 1.
        final_sigmas_type: "zero" (end at sigma 0) or "sigma_min" (end at the last sigma).
        thresholding, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas,
            use_dynamic_shifting: must be False. solver_p, shift_terminal: must be None.
        beta_start, beta_end, beta_schedule, trained_betas, steps_offset, timestep_spacing,
            sample_max_value, dynamic_thresholding_ratio, rescale_betas_zero_snr, sigma_min,
            sigma_max, time_shift_type: ignored.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        solver_order: int = 2,
        prediction_type: str = "flow_prediction",
        use_flow_sigmas: bool = True,
        flow_shift: float = 1.0,
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: Sequence[int] | None = (),
        final_sigmas_type: str = "zero",
        thresholding: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_dynamic_shifting: bool = False,
        solver_p: object | None = None,
        shift_terminal: float | None = None,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        steps_offset: int = 0,
        timestep_spacing: str = "linspace",
        sample_max_value: float = 1.0,
        dynamic_thresholding_ratio: float = 0.995,
        rescale_betas_zero_snr: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        time_shift_type: str = "exponential",
    ) -> None:
        super().__init__(num_train_timesteps)
        self._validate(locals())  # every constructor argument, by name
        self.solver_order = solver_order
        self.flow_shift = float(flow_shift)
        # The legacy DPM-Solver names all select the B(h) = e^h - 1 variant, as in diffusers.
        self.solver_type = "bh1" if solver_type == "bh1" else "bh2"
        self.lower_order_final = lower_order_final
        self.disable_corrector = frozenset(disable_corrector or ())
        self.final_sigmas_type = final_sigmas_type
        self._reset_state()

    @staticmethod
    def _validate(cfg: dict[str, object]) -> None:
        """Reject every setting whose math this flow-only implementation does not have."""
        exact = {
            "prediction_type": ("flow_prediction", "only 'flow_prediction'"),
            "use_flow_sigmas": (True, "only True"),
            "predict_x0": (True, "only True: the update runs on data predictions"),
            "thresholding": (False, "latent models do not threshold"),
            "use_karras_sigmas": (False, "only flow sigmas"),
            "use_exponential_sigmas": (False, "only flow sigmas"),
            "use_beta_sigmas": (False, "only flow sigmas"),
            "use_dynamic_shifting": (False, "only a static flow_shift"),
            "solver_p": (None, "only the built-in UniP predictor"),
        }
        for field, (want, why) in exact.items():
            require(cfg[field] == want, _OWNER, field, cfg[field], why)
        require(not cfg["shift_terminal"], _OWNER, "shift_terminal", cfg["shift_terminal"], "None")
        order = cfg["solver_order"]
        require(order in (1, 2, 3), _OWNER, "solver_order", order, "1, 2 or 3")
        shift = cfg["flow_shift"]
        ok_shift = isinstance(shift, int | float) and not isinstance(shift, bool) and shift > 0
        require(ok_shift, _OWNER, "flow_shift", shift, "a positive number")
        solver = cfg["solver_type"]
        solvers = ("bh1", "bh2", "midpoint", "heun", "logrho")
        require(solver in solvers, _OWNER, "solver_type", solver, "'bh1' or 'bh2'")
        final = cfg["final_sigmas_type"]
        finals = ("zero", "sigma_min")
        require(final in finals, _OWNER, "final_sigmas_type", final, "'zero' or 'sigma_min'")
        # The last step has h = inf (to sigma 0) or h = 0 ('sigma_min' repeats the last sigma),
        # so a multistep extrapolation there divides by zero: diffusers returns inf/NaN for
        # order 2 to sigma 0 and for order 3 either way. Refuse instead of producing garbage.
        lof_ok = cfg["lower_order_final"] or order == 1 or (order == 2 and final == "sigma_min")
        why = "False needs solver_order=1, or 2 with final_sigmas_type='sigma_min'"
        require(lof_ok, _OWNER, "lower_order_final", cfg["lower_order_final"], why)
        spacing = cfg["timestep_spacing"]
        spacings = ("linspace", "leading", "trailing")
        require(spacing in spacings, _OWNER, "timestep_spacing", spacing, "|".join(spacings))

    def _reset_state(self) -> None:
        """Forget the multistep history (called for every new schedule)."""
        # Data predictions x0 of the last `solver_order` steps, oldest first, each [B, ...].
        self._model_outputs: list[Tensor | None] = [None] * self.solver_order
        # Steps taken so far, capped at solver_order: limits the order during warm-up.
        self._lower_order_nums = 0
        # Input sample of the previous predictor step; the corrector restarts from it.
        self._last_sample: Tensor | None = None
        # Order of the previous predictor step; the corrector re-does it at that order.
        self._this_order = 0

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str = "cpu") -> None:
        """Build the flow-sigma schedule.

        sigmas: ``linspace(1, 1/N_train, steps + 1)[:-1]``, shifted, with 1e-6 taken off a
        leading 1 (alpha = 1 - sigma must stay > 0 for log(alpha)), then the final
        sigma appended: float32 [steps + 1] on the CPU. timesteps: ``sigmas[:-1] * N_train``
        truncated to int64 [steps] on ``device``.
        """
        self._check_num_steps(num_inference_steps)
        n_train = self.num_train_timesteps
        # float64 numpy on purpose: diffusers builds the schedule this way, and linspace /
        # rounding differences would otherwise flip float32 sigmas or integer timesteps.
        sigmas = np.linspace(1.0, 1.0 / n_train, num_inference_steps + 1)[:-1]
        sigmas = shift_flow_sigmas(sigmas, self.flow_shift)
        if abs(sigmas[0] - 1.0) < 1e-6:
            sigmas[0] -= 1e-6
        timesteps = sigmas * n_train
        last = sigmas[-1] if self.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = torch.from_numpy(np.append(sigmas, last).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self._reset_state()
        self._step_index = 0

    def step(self, model_output: Tensor, sample: Tensor) -> Tensor:
        """One UniC correction (from the second step on) and one UniP prediction.

        Args:
            model_output: predicted velocity [B, ...] at ``sigmas[step_index]``; any float
                dtype (e.g. bf16 while the sample is fp32).
            sample: current sample [B, ...] (at least 2 dims, e.g. [B, C, T, H, W] or
                [B, L, C]) at ``sigmas[step_index]``.

        Returns:
            The sample at ``sigmas[step_index + 1]``, same shape and dtype as ``sample``.
        """
        index = self._next_step_index()
        # sigma stays a 0-dim CPU tensor: a CPU scalar keeps its fp32 value when multiplied
        # with a bf16 GPU tensor, as in diffusers.
        x0 = sample - self.sigmas[index] * model_output

        if index > 0 and self._last_sample is not None and index - 1 not in self.disable_corrector:
            sample = self._uni_bh_update(self._last_sample, index - 1, self._this_order, model_t=x0)

        self._model_outputs = self._model_outputs[1:] + [x0]
        order = self.solver_order
        if self.lower_order_final:
            # Near the end the step sizes grow and the final sigma may be 0: drop the order.
            order = min(order, self.num_inference_steps - index)
        self._this_order = min(order, self._lower_order_nums + 1)  # warm-up: history is short
        self._last_sample = sample

        prev_sample = self._uni_bh_update(sample, index, self._this_order)
        self._lower_order_nums = min(self._lower_order_nums + 1, self.solver_order)
        self._step_index = index + 1
        return prev_sample

    def select_batch(self, index: Tensor) -> None:
        self._model_outputs = [
            None if m is None else m.index_select(0, index.to(m.device))
            for m in self._model_outputs
        ]
        if self._last_sample is not None:
            self._last_sample = self._last_sample.index_select(
                0, index.to(self._last_sample.device)
            )

    def _uni_bh_update(
        self, x: Tensor, s0: int, order: int, model_t: Tensor | None = None
    ) -> Tensor:
        """Move ``x`` [B, ...] from ``sigmas[s0]`` to ``sigmas[s0 + 1]`` (UniP-BH or UniC-BH).

        Uses the data predictions in the history, the newest of which (``m0``) belongs to
        ``sigmas[s0]``; the i-th older one belongs to ``sigmas[s0 - i]``.

        Args:
            x: sample at ``sigmas[s0]``.
            s0: schedule index of the step's start.
            order: number of data predictions (predictor) or of history terms plus the
                end-point term (corrector) the update uses.
            model_t: None for the predictor; for the corrector the data prediction [B, ...]
                at ``sigmas[s0 + 1]``, which is then used as an extra interpolation node.
        """
        device = x.device
        m0 = self._model_outputs[-1]
        sigma_t, sigma_s0 = self.sigmas[s0 + 1].to(device), self.sigmas[s0].to(device)
        alpha_t = 1 - sigma_t
        lambda_s0 = _half_log_snr(sigma_s0)
        h = _half_log_snr(sigma_t) - lambda_s0

        # Finite differences of the history, scaled by their step ratios r_k.
        rks, d1s = [], []
        for i in range(1, order):
            rk = (_half_log_snr(self.sigmas[s0 - i].to(device)) - lambda_s0) / h
            rks.append(rk)
            d1s.append((self._model_outputs[-(i + 1)] - m0) / rk)
        rks.append(torch.ones((), device=device))

        hh = -h  # the data-prediction form integrates in -lambda
        h_phi_1 = torch.expm1(hh)
        b_h = hh if self.solver_type == "bh1" else torch.expm1(hh)
        rhos = self._rhos(torch.stack(rks), hh, h_phi_1, b_h, order, model_t is not None, x)

        # Exponential-integrator first-order step; the operand order fixes the fp32 rounding.
        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        res = None
        if d1s:
            res = torch.einsum("k,bkc...->bc...", rhos[: len(d1s)], torch.stack(d1s, dim=1))
        if model_t is not None:
            end_term = rhos[-1] * (model_t - m0)
            res = end_term if res is None else res + end_term
        # Without higher-order terms diffusers still subtracts alpha_t * B(h) * 0; we skip it,
        # which is identical except for bh1 stepping to sigma 0, where B(h) = h = -inf and
        # diffusers' -inf * 0 turns the final sample into NaN.
        if res is not None:
            x_t = x_t - alpha_t * b_h * res
        return x_t.to(x.dtype)

    def _rhos(
        self,
        rks: Tensor,
        hh: Tensor,
        h_phi_1: Tensor,
        b_h: Tensor,
        order: int,
        corrector: bool,
        x: Tensor,
    ) -> Tensor | None:
        """Weights of the finite-difference terms, in ``x``'s dtype and device.

        The order conditions are ``sum_k rho_k r_k^(i-1) = b_i`` (``R rho = b`` with
        ``R[i, k] = r_k^i``). The predictor uses the first ``order - 1`` of them over the
        history nodes; the corrector all ``order`` of them, its last node being the end point
        (r = 1). The single-weight cases use the fixed 0.5 of the UniPC paper instead of the
        solution, as diffusers does.
        """
        if not corrector and order == 1:
            return None  # no history terms
        if (corrector and order == 1) or (not corrector and order == 2):
            return torch.ones(1, dtype=x.dtype, device=x.device) * 0.5
        r = torch.stack([torch.pow(rks, i) for i in range(order)])
        b = torch.stack(_phi_rhs(hh, h_phi_1, b_h, order))
        if not corrector:
            r, b = r[:-1, :-1], b[:-1]
        return torch.linalg.solve(r, b).to(x.device).to(x.dtype)
