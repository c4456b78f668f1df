"""Gaussian diffusion: schedule, DDIM (reference arithmetic), DPM-Solver++, guidance, Eq. 7 loss."""

import json

import pytest
import torch

from dawn.models.diffusion import (CosineSchedule, batch_quantile, classifier_free_guidance,
                                   ddim_sample, ddim_timesteps, diffusion_loss, dpm_solver_sample,
                                   dynamic_threshold)

SHAPE = (2, 3, 4, 8, 8)  # (B, C, T, H, W)


@pytest.fixture(scope="module")
def schedule():
    return CosineSchedule()


# --- schedule ---------------------------------------------------------------------------------------

def test_schedule_buffers_match_reference(schedule, reference_dir, reference_vector):
    manifest = json.loads((reference_dir / "manifest_a2v_128.json").read_text())
    expected_names = [entry[0] for entry in manifest["entries"][:12]]
    assert list(schedule.state_dict()) == expected_names
    vectors = reference_vector("unet_small").tensors
    for name, value in schedule.state_dict().items():
        assert value.dtype == torch.float32 and value.shape == (1000,)
        torch.testing.assert_close(value, vectors[name], rtol=0, atol=0)
    assert schedule.betas[0].item() == pytest.approx(4.13e-5, rel=2e-3)
    assert schedule.alphas_cumprod[999].item() == pytest.approx(2.43e-10, rel=2e-3)
    assert schedule.betas[999].item() == pytest.approx(0.9999)  # the only clipped beta
    assert schedule.betas[:999].max() < 0.9


def test_q_sample_and_predict_x0_invert(schedule):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.tensor([10, 500])
    x_t = schedule.q_sample(x0, t, noise)
    ac = schedule.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(x_t, ac.sqrt() * x0 + (1 - ac).sqrt() * noise)
    torch.testing.assert_close(schedule.predict_x0(x_t, t, noise), x0, atol=1e-4, rtol=0)


def test_ddim_timesteps_match_reference_lists():
    tops = [952, 904, 857, 809, 761, 714, 666, 619, 571, 523, 476, 428, 380, 333, 285, 238, 190,
            142, 95, 47, 0]
    assert ddim_timesteps(20) == list(zip(tops[:-1], tops[1:]))
    assert ddim_timesteps(3) == [(750, 500), (500, 250), (250, 0)]


# --- dynamic thresholding ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 11, 1001, 65537])
def test_batch_quantile_equals_torch_quantile(n):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n)).abs()
    assert torch.equal(batch_quantile(x, 0.9), torch.quantile(x, 0.9, dim=1))


def test_dynamic_threshold_semantics():
    x = torch.linspace(-3, 3, 1000).reshape(2, 1, 1, 10, 50)  # row 0 spans [-3, 0), row 1 (0, 3]
    x[1] *= 0.5  # second sample: |x| <= 1.5
    small = torch.full((1, 1, 1, 2, 2), 0.5)
    out = dynamic_threshold(torch.cat([x, x]), 0.9)
    for b in range(2):
        s = torch.quantile(x[b].abs().flatten(), 0.9)
        torch.testing.assert_close(out[b], x[b].clamp(-s, s) / s)
    assert out.abs().max() == 1
    torch.testing.assert_close(dynamic_threshold(small), small)  # s < 1 -> s = 1, unchanged


def test_dynamic_threshold_beyond_torch_quantile_limit():
    n = 2 ** 24 + 3  # one sample larger than torch.quantile accepts (16M elements)
    values = torch.randperm(n, generator=torch.Generator().manual_seed(0)).double()
    assert batch_quantile(values[None], 0.9).item() == pytest.approx(0.9 * (n - 1), abs=1e-6)
    x0 = (values.float() / (n - 1) * 4 - 2).reshape(1, 1, 1, 1, n)  # uniform in [-2, 2]
    out = dynamic_threshold(x0, 0.9)
    assert out.abs().max().item() == 1.0
    assert (out.abs() == 1).float().mean().item() == pytest.approx(0.1, abs=1e-3)


# --- DDIM -------------------------------------------------------------------------------------------

def test_ddim_replays_reference_vector(reference_vector):
    """The unet_small vector's DDIM with the stored noise, replaying the stored U-Net outputs."""
    vector = reference_vector("unet_small")
    diffusion, atol = vector.config["diffusion"], vector.atol
    calls = []

    def replay(x_t, t):
        i = len(calls)
        calls.append(t.tolist())
        torch.testing.assert_close(x_t, vector.output(f"ddim.step{i}.x_in"), rtol=0,
                                   atol=atol[f"ddim.step{i}.x_in"])
        return vector.output(f"ddim.step{i}.eps")

    noise = vector.input("ddim_noise")  # x_T, then one draw per step whose next time is > 0
    sample = ddim_sample(CosineSchedule(diffusion["timesteps"]), replay, tuple(noise.shape[1:]),
                         steps=diffusion["sampling_timesteps"], eta=diffusion["ddim_sampling_eta"], noise=noise,
                         dynamic_threshold=diffusion["use_dynamic_thres"],
                         percentile=diffusion["dynamic_thres_percentile"])
    assert calls == [[t] * noise.shape[1] for t in vector.meta["ddim"]["timesteps_fed_to_unet"]]
    torch.testing.assert_close(sample, vector.output("ddim.sample"), rtol=0, atol=atol["ddim.sample"])


def test_ddim_last_step_returns_clipped_x0(schedule):
    seen = []

    def wild(x_t, t):  # a poor denoiser: huge x0 predictions
        eps = -5 * torch.ones_like(x_t) + torch.sin(x_t)
        seen.append((x_t, t, eps))
        return eps

    steps = []
    out = ddim_sample(schedule, wild, SHAPE, steps=4, generator=torch.Generator().manual_seed(1),
                      progress=lambda i, total: steps.append((i, total)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    x_t, t, eps = seen[-1]
    assert t.tolist() == [200, 200]
    expected = dynamic_threshold(schedule.predict_x0(x_t, t, eps), 0.9)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.abs().max() <= 1 and out.abs().max() == 1
    # clip=False (unbounded motion targets): the same run returns the raw x0 prediction
    seen.clear()
    raw = ddim_sample(schedule, wild, SHAPE, steps=4, generator=torch.Generator().manual_seed(1), clip=False)
    x_t, t, eps = seen[-1]
    torch.testing.assert_close(raw, schedule.predict_x0(x_t, t, eps), rtol=0, atol=0)
    assert raw.abs().max() > 2


def test_seeded_sampling_is_reproducible(schedule):
    def denoise(x_t, t):
        return 0.3 * x_t + t.view(-1, 1, 1, 1, 1) / 1000

    def run(seed, sampler=ddim_sample):
        return sampler(schedule, denoise, SHAPE, steps=5, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7), run(8))
    assert torch.equal(run(7, dpm_solver_sample), run(7, dpm_solver_sample))
    # a generator is the same stream as pre-drawn noise: x_T, then one draw per step with t' > 0
    g = torch.Generator().manual_seed(7)
    drawn = [torch.randn(SHAPE, generator=g) for _ in range(5)]
    assert torch.equal(ddim_sample(schedule, denoise, SHAPE, steps=5, noise=drawn), run(7))


# --- DPM-Solver++ on Gaussian data (closed-form optimal denoiser and exact ODE solution) ------------

def test_dpm_solver_converges_to_exact_ode_solution(schedule):
    """Data x0 ~ N(mu, std^2) per element: eps*(x_t) = sigma (x_t - a mu) / (a^2 std^2 + sigma^2)
    and the probability-flow ODE maps x_T to mu + std z with z = (x_T - a_T mu) / sqrt(a_T^2 std^2 +
    sigma_T^2). (The reference DDIM is not a consistent ODE solver, its index shift biases it more as
    steps grow, so the exact solution is the target.)"""
    g = torch.Generator().manual_seed(1)
    mu = 0.3 * (torch.rand(SHAPE[1:], generator=g) - 0.5)
    std = 0.1 + 0.2 * torch.rand(SHAPE[1:], generator=g)
    ac = schedule.alphas_cumprod.double()

    def optimal_eps(x_t, t):
        a, sigma = ac[t].sqrt().view(-1, 1, 1, 1, 1), (1 - ac[t]).sqrt().view(-1, 1, 1, 1, 1)
        return (sigma * (x_t.double() - a * mu) / (a ** 2 * std ** 2 + sigma ** 2)).float()

    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    a_T, sigma_T = ac[999].sqrt(), (1 - ac[999]).sqrt()
    exact = (mu + std * (x_T - a_T * mu) / (a_T ** 2 * std ** 2 + sigma_T ** 2).sqrt()).float()

    calls = []
    dpm = dpm_solver_sample(schedule, optimal_eps, SHAPE, steps=20, noise=[x_T],
                            dynamic_threshold=False, progress=lambda i, n: calls.append(n))
    ddim = ddim_sample(schedule, optimal_eps, SHAPE, steps=20, eta=0.0, noise=[x_T],
                       dynamic_threshold=False)
    dpm_error, ddim_error = (dpm - exact).abs(), (ddim - exact).abs()
    assert len(calls) <= 20
    assert dpm_error.mean() < 0.006 and dpm_error.max() < 0.05
    assert dpm_error.mean() < 0.25 * ddim_error.mean()
    # dynamic thresholding is inactive for data inside [-1, 1] (s = max(q, 1) = 1)
    thresholded = dpm_solver_sample(schedule, optimal_eps, SHAPE, steps=20, noise=[x_T])
    torch.testing.assert_close(thresholded, dpm)


# --- guidance ---------------------------------------------------------------------------------------

def test_classifier_free_guidance():
    def cond(x, t):
        return x + 1

    def null(x, t):
        return 2 * x

    x, t = torch.randn(SHAPE), torch.zeros(2, dtype=torch.long)
    assert classifier_free_guidance(cond, null, 1.0) is cond
    torch.testing.assert_close(classifier_free_guidance(cond, null, 3.0)(x, t),
                               2 * x + (x + 1 - 2 * x) * 3.0)


# --- loss (paper Eq. 7) -----------------------------------------------------------------------------

def _loss_inputs():
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(SHAPE, generator=g) * 1.6 - 0.8
    noise = torch.randn(SHAPE, generator=g)
    t = torch.tensor([100, 700])
    lip_mask = torch.zeros(SHAPE[0], 1, *SHAPE[2:])
    lip_mask[..., 5:7, 2:6] = 1  # a mouth box at latent resolution
    return x0, noise, t, lip_mask


def test_loss_follows_eq7(schedule):
    x0, noise, t, lip_mask = _loss_inputs()

    def denoise(x_t, t):
        return 0.5 * x_t

    sq_err = (0.5 * schedule.q_sample(x0, t, noise) - noise) ** 2
    plain = diffusion_loss(schedule, denoise, x0, t=t, noise=noise)
    torch.testing.assert_close(plain["loss"], sq_err.mean())
    assert plain["lip_mse"] == 0 and plain["fft"] == 0
    for w_lip in (1.0, 0.15):
        out = diffusion_loss(schedule, denoise, x0, t=t, noise=noise, lip_mask=lip_mask, w_lip=w_lip)
        torch.testing.assert_close(out["eps_mse"], sq_err.mean())
        torch.testing.assert_close(out["lip_mse"], (sq_err * lip_mask).mean())
        # L = L_simple + w_lip (L_simple (x) m_lip): lip elements weigh 1 + w_lip
        torch.testing.assert_close(out["loss"], (sq_err * (1 + w_lip * lip_mask)).mean())
    eye_mask = lip_mask.roll(1, dims=-1)  # another region, overlapping the first in part
    both = diffusion_loss(schedule, denoise, x0, t=t, noise=noise, lip_mask=lip_mask, w_lip=2.0,
                          eye_mask=eye_mask, w_eye=3.0)
    torch.testing.assert_close(both["eye_mse"], (sq_err * eye_mask).mean())
    torch.testing.assert_close(both["loss"], (sq_err * (1 + 2.0 * lip_mask + 3.0 * eye_mask)).mean())
    assert "eye_mse" not in plain
    full = diffusion_loss(schedule, denoise, x0, t=t, noise=noise, lip_mask=torch.ones_like(lip_mask))
    torch.testing.assert_close(full["loss"], 2 * plain["loss"])


def test_v_prediction_loss_and_eps_conversion(schedule):
    x0, noise, t, lip_mask = _loss_inputs()
    x_t = schedule.q_sample(x0, t, noise)
    v = schedule.v_target(x0, t, noise)
    ac = schedule.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(v, ac.sqrt() * noise - (1 - ac).sqrt() * x0)
    torch.testing.assert_close(schedule.eps_from_v(x_t, t, v), noise, atol=1e-5, rtol=0)

    perfect = diffusion_loss(schedule, lambda x, tt: schedule.v_target(x0, tt, noise), x0, t=t, noise=noise,
                             lip_mask=lip_mask, prediction="v")
    assert perfect["loss"] < 1e-10 and perfect["eps_mse"] < 1e-10  # the true v is the eps loss's optimum too
    out = diffusion_loss(schedule, lambda x, tt: 0.5 * x, x0, t=t, noise=noise, lip_mask=lip_mask, w_lip=0.5,
                         prediction="v")
    sq_err = (0.5 * x_t - v) ** 2  # the squared error of v, not of eps
    torch.testing.assert_close(out["v_mse"], sq_err.mean())
    torch.testing.assert_close(out["loss"], (sq_err * (1 + 0.5 * lip_mask)).mean())
    torch.testing.assert_close(out["eps_mse"], ((schedule.eps_from_v(x_t, t, 0.5 * x_t) - noise) ** 2).mean())
    with pytest.raises(ValueError, match="prediction"):
        diffusion_loss(schedule, lambda x, tt: x, x0, t=t, noise=noise, prediction="x0")


def test_loss_fft_term(schedule):
    x0, noise, t, _ = _loss_inputs()
    perfect = diffusion_loss(schedule, lambda x_t, t_: noise, x0, t=t, noise=noise, fft_weight=0.15)
    assert perfect["eps_mse"] == 0 and perfect["fft"] < 1e-4

    def denoise(x_t, t_):
        return 0.9 * noise + 0.1 * x_t

    out = diffusion_loss(schedule, denoise, x0, t=t, noise=noise, fft_weight=0.15)
    x0_pred = schedule.predict_x0(schedule.q_sample(x0, t, noise), t,
                                  denoise(schedule.q_sample(x0, t, noise), t)).clamp(-1, 1)
    expected = (torch.fft.rfft(x0_pred[:, :2], dim=2) - torch.fft.rfft(x0[:, :2], dim=2)).abs().mean()
    torch.testing.assert_close(out["fft"], expected)
    torch.testing.assert_close(out["loss"], out["eps_mse"] + 0.15 * expected)


def test_loss_draws_from_generator_and_backpropagates(schedule):
    x0, _, _, lip_mask = _loss_inputs()
    net = torch.nn.Conv3d(3, 3, 3, padding=1)

    def denoise(x_t, t):
        return net(x_t)

    first = diffusion_loss(schedule, denoise, x0, lip_mask=lip_mask, fft_weight=0.15,
                           generator=torch.Generator().manual_seed(5))
    second = diffusion_loss(schedule, denoise, x0, lip_mask=lip_mask, fft_weight=0.15,
                            generator=torch.Generator().manual_seed(5))
    assert torch.equal(first["loss"], second["loss"])
    first["loss"].backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0
