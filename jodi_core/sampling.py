"""Flow-matching samplers: the official DPM-Solver++(2M) and a flow Euler sampler, as plain functions.

Rectified-flow time ``t`` runs from (almost) 1 to 0 with ``x_t = (1 - t) x0 + t noise``; the network predicts the
velocity ``v = noise - x0``, so the data prediction is ``x0 = x - t v``. Samplers take a ``velocity(x, t)`` function
(guidance already applied) and the time grid, and know nothing about the model: the schedule comes in as numbers,
progress goes out through ``callback`` (as in ComfyUI's k-diffusion samplers).

DPM-Solver++ (Lu et al., 2022, arXiv 2211.01095) in flow form: ``alpha_t = 1 - t``, ``sigma_t = t``,
``lambda_t = log(alpha_t / sigma_t)``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(step, x0_pred, x_next, total_steps), called after each step
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, int], None]


class Interrupted(RuntimeError):
    """Sampling was stopped between two steps because ``should_stop()`` returned True."""


def flow_timesteps(steps: int, flow_shift: float = 3.0, device: "torch.device | str | None" = None) -> torch.Tensor:
    """The official time grid: ``steps + 1`` points from 0.99967 down to exactly 0 (float32).

    A uniform grid ``u`` over [0, 0.999] is shifted by ``sigma(u) = s u / (1 + (s - 1) u)`` and reversed, as the
    reference's ``time_uniform_flow`` skip type does. The model is evaluated at the first ``steps`` points only.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    if not flow_shift > 0:
        raise ValueError(f"flow_shift must be positive, got {flow_shift!r}.")
    u = 1 - torch.linspace(1, 0.001, int(steps) + 1, dtype=torch.float32)
    shifted = flow_shift * u / (1 + (flow_shift - 1) * u)
    return shifted.flip(0).to(device)


def _log_snr(t: torch.Tensor) -> torch.Tensor:
    """lambda_t = log(alpha_t / sigma_t); +inf at t = 0."""
    return torch.log1p(-t) - torch.log(t)


@torch.no_grad()
def _integrate(update, velocity: VelocityFn, x: torch.Tensor, timesteps: torch.Tensor, *,
               callback: Optional[StepCallback] = None,
               should_stop: Optional[Callable[[], bool]] = None) -> torch.Tensor:
    """The one sampler loop: ``update(i, t, x, x0, x0_prev, v)`` gives ``x_{i+1}``; stop checks and progress here."""
    t = timesteps.to(device=x.device, dtype=torch.float32)
    steps = t.numel() - 1
    x0_prev = None
    for i in range(steps):
        if should_stop is not None and should_stop():
            raise Interrupted("Sampling was interrupted.")
        v = velocity(x, t[i])
        x0 = x - t[i] * v
        x = update(i, t, x, x0, x0_prev, v)
        x0_prev = x0
        if callback is not None:
            callback(i, x0, x, steps)
    return x


def _dpmpp_2m_update(i, t, x, x0, x0_prev, v):
    t_cur, t_next = t[i], t[i + 1]
    if t_next == 0:
        return x0  # lambda = +inf: the update reduces to the data prediction itself
    h = _log_snr(t_next) - _log_snr(t_cur)
    phi = torch.expm1(-h)
    alpha_next = 1 - t_next
    x_next = (t_next / t_cur) * x - alpha_next * phi * x0
    if x0_prev is not None and i < t.numel() - 2:  # first order on the first and the last step
        r = (_log_snr(t_cur) - _log_snr(t[i - 1])) / h
        x_next = x_next - 0.5 * alpha_next * phi * (x0 - x0_prev) / r
    return x_next


def _euler_update(i, t, x, x0, x0_prev, v):
    return x + (t[i + 1] - t[i]) * v


def sample_dpmpp_2m(velocity: VelocityFn, x: torch.Tensor, timesteps: torch.Tensor, **hooks) -> torch.Tensor:
    """Multistep DPM-Solver++ of order 2, first order on the first and the last step (``lower_order_final``).

    ``hooks``: ``callback(step, x0_pred, x_next, total_steps)`` after each step, ``should_stop()`` before each.
    """
    return _integrate(_dpmpp_2m_update, velocity, x, timesteps, **hooks)


def sample_euler(velocity: VelocityFn, x: torch.Tensor, timesteps: torch.Tensor, **hooks) -> torch.Tensor:
    """Flow Euler: ``x_{i+1} = x_i + (t_{i+1} - t_i) v``; ``hooks`` as for :func:`sample_dpmpp_2m`."""
    return _integrate(_euler_update, velocity, x, timesteps, **hooks)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; expected one of {', '.join(sorted(SAMPLERS))}.")
    return SAMPLERS[name]


def cfg_velocity(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance. Guiding ``v`` equals the reference's guidance on ``eps = x + (1 - t) v``
    because that map is affine in ``v`` with the same ``x`` for both halves."""
    return v_uncond + scale * (v_cond - v_uncond)
