"""Gaussian diffusion for A2V-FDM (paper §3.1; ARCHITECTURE.md §4.6, §4.7), apart from any network.

The denoiser is any callable `denoise(x_t, t) -> eps` with x_t (B, C, T, H, W) and t an int64 (B,)
tensor of diffusion steps; it predicts the noise eps (same layout as x_t). This module holds:

- `CosineSchedule`: the 1000-step cosine noise schedule as the 12 float32 buffers of the released
  checkpoints (state-dict names as in the reference), q_sample and the eps -> x0 conversion.
- `ddim_sample`: the reference DDIM sampler (all frames in one pass), bugs-as-trained included
  (index shift, raw eps reused after clipping), with per-sample dynamic thresholding.
- `dpm_solver_sample`: DPM-Solver++(2M), an optional faster deterministic sampler.
- `classifier_free_guidance`: wraps a conditional and a null denoiser (null + (cond - null) * scale).
- `diffusion_loss`: the training objective, paper Eq. 7 (+ the reference's optional temporal-FFT term).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t int64 (B,)) -> eps
Progress = Callable[[int, int], None]  # (steps done, total steps)


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values (N,) indexed by t (B,) -> (B, 1, ..., 1) broadcastable against an ndim-d tensor."""
    return values[t].reshape(-1, *([1] * (ndim - 1)))


class CosineSchedule(nn.Module):
    """Cosine schedule (Nichol & Dhariwal, s = 0.008) computed in float64, kept as float32 buffers.

    a(k) = cos(((k/N) + s)/(1 + s) * pi/2)^2, a /= a(0); beta_t = clip(1 - a(t+1)/a(t), 0, 0.9999).
    Buffer names and order match the reference `GaussianDiffusion` state dict (ARCHITECTURE.md §4.6).
    """

    def __init__(self, timesteps: int = 1000, s: float = 0.008):
        super().__init__()
        self.timesteps = timesteps
        k = torch.arange(timesteps + 1, dtype=torch.float64)
        a = torch.cos(((k / timesteps) + s) / (1 + s) * math.pi / 2) ** 2
        a = a / a[0]
        betas = (1 - a[1:] / a[:-1]).clamp(0, 0.9999)
        ac = torch.cumprod(1 - betas, dim=0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        posterior_variance = betas * (1 - ac_prev) / (1 - ac)
        buffers = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
            "log_one_minus_alphas_cumprod": (1 - ac).log(),
            "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
            "posterior_mean_coef1": betas * ac_prev.sqrt() / (1 - ac),
            "posterior_mean_coef2": (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float())

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward process: x_t = sqrt(ac[t]) x0 + sqrt(1 - ac[t]) noise; t int64 (B,)."""
        return (_gather(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(1/ac[t]) x_t - sqrt(1/ac[t] - 1) eps; t int64 (B,)."""
        return (_gather(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
                - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = sqrt(ac[t]) noise - sqrt(1 - ac[t]) x0 (v-prediction, Salimans & Ho 2022)."""
        return (_gather(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
                - _gather(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)

    def eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(ac[t]) v + sqrt(1 - ac[t]) x_t (the inverse of `v_target` given x_t)."""
        return (_gather(self.sqrt_alphas_cumprod, t, x_t.ndim) * v
                + _gather(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t)


PREDICTIONS = ("eps", "v")


def eps_denoiser(schedule: CosineSchedule, network: Denoiser, prediction: str) -> Denoiser:
    """The samplers' denoise(x_t, t) -> eps from a network that predicts `prediction` ("eps" or "v")."""
    if prediction == "eps":
        return network
    if prediction != "v":
        raise ValueError(f"unknown prediction {prediction!r} (known: {PREDICTIONS})")
    return lambda x_t, t: schedule.eps_from_v(x_t, t, network(x_t, t).to(x_t.dtype))


# --- dynamic thresholding (Imagen; ARCHITECTURE.md §4.6) -------------------------------------------

def batch_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """q-quantile of each row of x (B, N) -> (B,), identical to torch.quantile(x, q, dim=1).

    Linear interpolation between the order statistics at rank q*(N-1), found with kthvalue, so there
    is no 16M-element input limit (torch.quantile has one) and no full sort.
    """
    n = x.shape[1]
    rank = torch.tensor(q, dtype=x.dtype) * (n - 1)
    below = int(rank.floor())
    value_below = x.kthvalue(below + 1, dim=1).values
    value_above = x.kthvalue(min(below + 2, n), dim=1).values
    return torch.lerp(value_below, value_above, (rank - below).item())


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.9) -> torch.Tensor:
    """Per sample: s = max(quantile(|x0|, percentile), 1); x0 -> clamp(x0, -s, s) / s, in [-1, 1]."""
    s = batch_quantile(x0.reshape(x0.shape[0], -1).abs(), percentile).clamp(min=1.0)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return x0.clamp(-s, s) / s


def _clip_x0(x0: torch.Tensor, dynamic: bool, percentile: float, clip: bool = True) -> torch.Tensor:
    if not clip:
        return x0
    return dynamic_threshold(x0, percentile) if dynamic else x0.clamp(-1.0, 1.0)


# --- samplers ---------------------------------------------------------------------------------------

def ddim_timesteps(steps: int, timesteps: int = 1000) -> list[tuple[int, int]]:
    """Reference DDIM step pairs (t, t_next): linspace(0, T, steps+2) minus the last, truncated to
    int, reversed. 3 steps -> [(750, 500), (500, 250), (250, 0)]. Pairs with t == t_next (truncation
    repeats times once steps > T/2) are dropped; the reference would divide by zero at (0, 0)."""
    times = torch.linspace(0, timesteps, steps + 2)[:-1].int().tolist()[::-1]
    return [(t, t_next) for t, t_next in zip(times[:-1], times[1:]) if t != t_next]


def _initial_noise(shape, noise, generator, device) -> torch.Tensor:
    if noise is not None:
        return noise[0].to(device=device, dtype=torch.float32)
    return torch.randn(shape, generator=generator, device=device)


@torch.no_grad()
def ddim_sample(schedule: CosineSchedule, denoise: Denoiser, shape: Sequence[int], steps: int = 20,
                eta: float = 1.0, generator: torch.Generator | None = None,
                noise: Sequence[torch.Tensor] | None = None, dynamic_threshold: bool = True,
                percentile: float = 0.9, progress: Progress | None = None, clip: bool = True) -> torch.Tensor:
    """DDIM exactly as the reference `GaussianDiffusion.ddim_sample` (ARCHITECTURE.md §4.6).

    shape: (B, C, T, H, W); returns x0 of that shape on the schedule's device. Per step (t -> t'):
    x0 = clip(predict_x0(x_t, t, eps)) with ac[t], but the update uses alpha = ac_prev[t] and
    alpha' = ac_prev[t'] (the index shift the released model was sampled with), and the raw eps:
        sigma = eta sqrt((1 - alpha/alpha') (1 - alpha') / (1 - alpha)),
        x_t' = sqrt(alpha') x0 + sqrt(1 - alpha' - sigma^2) eps + sigma z,  z drawn only if t' > 0.
    With eta = 1 the last step (t' = 0) returns the clipped x0 itself, so the result is in [-1, 1].
    Clipping is per-sample dynamic thresholding, or clamp(-1, 1) when dynamic_threshold is False, or none
    when clip is False (targets not bounded by 1, e.g. A2VConfig.motion_target "offset"). Random draws: x_T, then (if eta > 0) one N(0, I) per step with t' > 0, from `generator`, or taken
    in that order from `noise` (a sequence of tensors of `shape`: x_T first) when given.
    """
    device = schedule.betas.device
    pairs = ddim_timesteps(steps, schedule.timesteps)
    x = _initial_noise(shape, noise, generator, device)
    draws = 1
    for i, (t, t_next) in enumerate(pairs):
        t_batch = torch.full((shape[0],), t, dtype=torch.long, device=device)
        eps = denoise(x, t_batch).to(x.dtype)
        x0 = _clip_x0(schedule.predict_x0(x, t_batch, eps), dynamic_threshold, percentile, clip)
        alpha, alpha_next = schedule.alphas_cumprod_prev[t], schedule.alphas_cumprod_prev[t_next]
        sigma = eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt()
        c = (1 - alpha_next - sigma ** 2).sqrt()
        x = x0 * alpha_next.sqrt() + c * eps
        if t_next > 0 and eta > 0:
            z = noise[draws].to(x) if noise is not None else torch.randn(
                x.shape, generator=generator, device=device)
            draws += 1
            x = x + sigma * z
        if progress is not None:
            progress(i + 1, len(pairs))
    return x


@torch.no_grad()
def dpm_solver_sample(schedule: CosineSchedule, denoise: Denoiser, shape: Sequence[int],
                      steps: int = 20, generator: torch.Generator | None = None,
                      noise: Sequence[torch.Tensor] | None = None, dynamic_threshold: bool = True,
                      percentile: float = 0.9, progress: Progress | None = None, clip: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, multistep, data prediction): deterministic, at most `steps`
    denoiser calls at the integer times nearest to a grid uniform in log-SNR from t = T-1 to t = 0
    (duplicates merged: the cosine schedule's last step jumps by 4.6 in log-SNR); the result is the
    clipped x0 prediction at t = 0, in [-1, 1]. Not the reference sampler (that is `ddim_sample`).

    With alpha_t = sqrt(ac[t]), sigma_t = sqrt(1 - ac[t]), lambda_t = log(alpha_t / sigma_t),
    h = lambda_t - lambda_s and r = h_prev / h, the update s -> t is
        D = (1 + 1/(2r)) x0_s - 1/(2r) x0_prev   (first step: D = x0_s)
        x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) D.
    Clipping of each x0 prediction as in `ddim_sample` (none when clip is False). Only x_T is random (`generator` or noise[0]).
    """
    device = schedule.betas.device
    ac = schedule.alphas_cumprod.double()
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
    lam = alpha.log() - sigma.log()  # decreasing in t
    grid = torch.linspace(lam[-1].item(), lam[0].item(), steps, dtype=torch.float64, device=lam.device)
    nearest = (lam[None, :] - grid[:, None]).abs().argmin(dim=1).tolist()
    times = sorted(set(nearest), reverse=True)
    x = _initial_noise(shape, noise, generator, device)
    x0_prev, h_prev = None, None
    for i, s in enumerate(times):
        s_batch = torch.full((shape[0],), s, dtype=torch.long, device=device)
        eps = denoise(x, s_batch).to(x.dtype)
        x0 = _clip_x0(schedule.predict_x0(x, s_batch, eps), dynamic_threshold, percentile, clip)
        if i == len(times) - 1:
            x = x0
        else:
            t = times[i + 1]
            h = (lam[t] - lam[s]).item()
            d = x0 if x0_prev is None else (1 + h / (2 * h_prev)) * x0 - h / (2 * h_prev) * x0_prev
            x = (sigma[t] / sigma[s]).item() * x - (alpha[t] * math.expm1(-h)).item() * d
            x0_prev, h_prev = x0, h
        if progress is not None:
            progress(i + 1, len(times))
    return x


def classifier_free_guidance(denoise_cond: Denoiser, denoise_null: Denoiser,
                             cond_scale: float) -> Denoiser:
    """Guided denoiser null + (cond - null) * cond_scale (two calls); just denoise_cond at scale 1.

    denoise_null is the same network with every frame's condition replaced by the null (all-zero)
    condition (ARCHITECTURE.md §4.6).
    """
    if cond_scale == 1:
        return denoise_cond

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, null = denoise_cond(x_t, t), denoise_null(x_t, t)
        return null + (cond - null) * cond_scale

    return guided


# --- training objective -----------------------------------------------------------------------------

def diffusion_loss(schedule: CosineSchedule, denoise: Denoiser, x0: torch.Tensor,
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   lip_mask: torch.Tensor | None = None, w_lip: float = 1.0, fft_weight: float = 0.0,
                   eye_mask: torch.Tensor | None = None, w_eye: float = 0.0, generator: torch.Generator | None = None, prediction: str = "eps") -> dict[str, torch.Tensor]:
    """Paper Eq. 7, L = L_simple + w_lip * (L_simple (x) m_lip), plus an optional temporal-FFT term.

    x0: clean target (B, C, T, H, W) (A2V: flow x, flow y, 2*occ-1). t: int64 (B,), uniform in
    [0, timesteps) when None; noise ~ N(0, I) when None (both from `generator`).
    With e = (eps - eps_pred)^2 per element and every mean taken over all elements:
      eps_mse = mean(e)                        (L_simple, Eq. 2)
      lip_mse = mean(e * lip_mask)             (lip_mask (B, 1, T, H, W) in [0, 1], broadcast over C;
                                                0 without a mask), so each lip element weighs 1 + w_lip
      eye_mse = mean(e * eye_mask)             (the same over the eyes' boxes; w_eye = 0 is the paper's loss)
      fft     = mean |rFFT_T(clamp(x0_pred, -1, 1)[:, :2]) - rFFT_T(x0[:, :2])|   (reference term on
                the flow channels, ARCHITECTURE.md §4.7; computed only if fft_weight > 0, else 0)
      loss    = eps_mse + w_lip * lip_mse + w_eye * eye_mse + fft_weight * fft.
    prediction="v": the network predicts v (`CosineSchedule.v_target`) and e is its squared error instead;
    the loss then reads v_mse + w_lip * lip_mse + fft_weight * fft, and eps_mse (of the eps the v
    implies) is still reported so that runs of both kinds compare.
    """
    batch = x0.shape[0]
    if t is None:
        t = torch.randint(0, schedule.timesteps, (batch,), generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = schedule.q_sample(x0, t, noise)
    output = denoise(x_t, t).float()
    if prediction == "eps":
        eps_pred, target = output, noise.float()
    elif prediction == "v":
        eps_pred, target = schedule.eps_from_v(x_t.float(), t, output), schedule.v_target(x0.float(), t, noise.float())
    else:
        raise ValueError(f"unknown prediction {prediction!r} (known: {PREDICTIONS})")
    sq_err = (output - target) ** 2
    zero = sq_err.new_zeros(())
    eps_mse = ((eps_pred - noise.float()) ** 2).mean() if prediction == "v" else sq_err.mean()
    lip_mse = (sq_err * lip_mask.to(sq_err)).mean() if lip_mask is not None else zero
    eye_mse = (sq_err * eye_mask.to(sq_err)).mean() if eye_mask is not None else zero
    fft = zero
    if fft_weight > 0:
        x0_pred = schedule.predict_x0(x_t.float(), t, eps_pred).clamp(-1.0, 1.0)
        spectrum_pred = torch.fft.rfft(x0_pred[:, :2], dim=2)
        spectrum_true = torch.fft.rfft(x0[:, :2].float(), dim=2)
        fft = (spectrum_pred - spectrum_true).abs().mean()
    loss = sq_err.mean() + w_lip * lip_mse + w_eye * eye_mse + fft_weight * fft
    losses = {"loss": loss, "eps_mse": eps_mse, "lip_mse": lip_mse, "fft": fft}
    if eye_mask is not None:
        losses["eye_mse"] = eye_mse
    if prediction == "v":
        losses["v_mse"] = sq_err.mean()
    return losses
