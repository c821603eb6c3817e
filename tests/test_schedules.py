import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowalign.sampling import flux_mu, flux_sigmas, sd3_sigmas, shift_sigmas


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 10, 28, 40])
def test_sd3_sigmas_match_diffusers(shift, steps):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps)
    ours = sd3_sigmas(steps, shift=shift)
    assert ours.shape == (steps + 1,)
    torch.testing.assert_close(ours, sched.sigmas.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", [4, 28, 50])
@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_flux_dynamic_sigmas_match_diffusers(steps, seq_len):
    # FLUX.1-dev's scheduler config: dynamic shifting, base 0.5, max 1.15, seq 256..4096
    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    base = [1.0 - i * (1 - 1 / steps) / (steps - 1) for i in range(steps)]  # as FluxPipeline passes
    mu = flux_mu(seq_len)
    sched.set_timesteps(sigmas=base, mu=mu)
    torch.testing.assert_close(flux_sigmas(steps, seq_len), sched.sigmas.float(), rtol=0, atol=1e-6)


def test_flux_static_shift_is_schnell():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    torch.testing.assert_close(flux_sigmas(4, dynamic=False), sched.sigmas.float(), rtol=0, atol=1e-6)


def test_shift_formula_and_monotonic():
    s = torch.linspace(1, 0.01, 50)
    out = shift_sigmas(s, 3.0)
    torch.testing.assert_close(out, 3 * s / (1 + 2 * s))
    assert out[0] == 1  # the noise end stays fixed
    assert (out[1:] < out[:-1]).all()
    assert (out[1:] >= s[1:]).all()  # a shift > 1 spends more steps at high noise


def test_bad_inputs():
    with pytest.raises(ValueError, match="positive integer"):
        sd3_sigmas(0)
    with pytest.raises(ValueError, match="image_seq_len"):
        flux_sigmas(4)
    with pytest.raises(ValueError, match="shift must be > 0"):
        shift_sigmas(torch.ones(2), 0.0)
