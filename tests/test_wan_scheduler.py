"""Wan2.1's flow-matching UniPC sampler against diffusers' UniPCMultistepScheduler.

diffusers is configured as its WanPipeline docs configure it (flow_prediction, use_flow_sigmas,
flow_shift, 1000 train steps; order 2, bh2, predict_x0, lower_order_final by default). Its own
sigma grid differs from the release's (see models/wan/scheduler.py); handed the release's grid
through `set_timesteps(sigmas=...)` it must reproduce ours exactly, and its default grid must
differ from ours exactly as documented.
"""

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from models.wan.scheduler import FlowUniPC  # noqa: E402

STEPS = (1, 2, 5, 50)
SHIFTS = (3.0, 5.0)
RELEASE_TOP = float(np.float32(0.999))  # the release's first training sigma, stored in fp32


def _diffusers(shift, steps, grid=None):
    sched = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=shift
    )
    if grid is None:
        sched.set_timesteps(steps)
    else:
        sched.set_timesteps(sigmas=grid)
    sched.set_begin_index(0)  # as WanPipeline does
    return sched


def _release_grid(steps):
    """The release's unshifted grid: np.linspace(sigma_max, sigma_min, steps + 1)[:-1]."""
    return np.linspace(RELEASE_TOP, 0.0, steps + 1)[:-1]


def _shift(s, shift):
    return shift * s / (1 + (shift - 1) * s)


def _unshift(s, shift):
    return s / (shift - (shift - 1) * s)


def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear stand-in for the DiT (fp32, elementwise in x)."""
    return torch.tanh(1.5 * x) * (t / 1000) + 0.3 * torch.sin(3 * x + t / 300) - 0.1 * x


def _noise(shape=(1, 4, 3, 6, 5), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), device="cpu")


def _run_ours(x, steps, shift):
    s = FlowUniPC(steps=steps, shift=shift)
    for i, t in enumerate(s.timesteps()):
        x = s.step(x, velocity(x, t[None]), i)
    return x


def _run_diffusers(x, sched):
    for t in sched.timesteps:
        x = sched.step(velocity(x, t.float()[None]), t, x, return_dict=False)[0]
    return x


def test_validation():
    with pytest.raises(ValueError, match="steps"):
        FlowUniPC(steps=0)
    with pytest.raises(ValueError, match="shift"):
        FlowUniPC(steps=4, shift=0.0)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_schedule_equals_diffusers_on_the_release_grid(steps, shift):
    s = FlowUniPC(steps=steps, shift=shift)
    sig, ts = s.sigmas(), s.timesteps()
    assert sig.dtype == torch.float64 and sig.shape == (steps + 1,) and sig[-1] == 0
    assert ts.dtype == torch.float32 and ts.shape == (steps,)
    assert torch.equal(ts, ts.round()), "the release hands the model int64 timesteps"
    ref = _diffusers(shift, steps, _release_grid(steps))
    assert torch.equal(sig, ref.sigmas.double())
    assert torch.equal(ts, ref.timesteps.float())


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_diffusers_default_grid_differs_as_documented(steps, shift):
    """diffusers: linspace(1, 1/1000, N + 1)[:-1], shifted, first sigma set to 1 - 1e-6; the
    release: linspace(float32(0.999), 0, N + 1)[:-1], shifted. Both end in 0."""
    ours = FlowUniPC(steps=steps, shift=shift).sigmas()
    ref = _diffusers(shift, steps)
    grid = _shift(np.linspace(1.0, 1e-3, steps + 1)[:-1], shift)
    grid[0] -= 1e-6
    assert torch.equal(ref.sigmas, torch.from_numpy(np.append(grid, 0.0).astype(np.float32)))
    assert ref.sigmas[0].item() == pytest.approx(1 - 1e-6, abs=1e-7)
    assert ours[0].item() == pytest.approx(_shift(RELEASE_TOP, shift), abs=1e-7)
    assert ref.sigmas[-1] == 0 and ours[-1] == 0
    # below the first node, diffusers' unshifted grid sits exactly 1/1000 above the release's
    gap = _unshift(ref.sigmas[1:-1].double().numpy(), shift) - _unshift(ours[1:-1].numpy(), shift)
    np.testing.assert_allclose(gap, 1e-3, atol=2e-6)
    ts, ref_ts = FlowUniPC(steps=steps, shift=shift).timesteps(), ref.timesteps.float()
    assert ts[0] == ref_ts[0] == 999
    if steps == 50 and shift == 5.0:
        assert int((ts != ref_ts).sum()) == 27 and float((ref_ts - ts).max()) == 4
        assert (ts[-1].item(), ref_ts[-1].item()) == (92, 96)


@pytest.mark.parametrize("steps", (10, 50))
@pytest.mark.parametrize("shift", SHIFTS)
def test_sampling_run_equals_diffusers(steps, shift):
    x0 = _noise()
    ours = _run_ours(x0.clone(), steps, shift)
    ref = _run_diffusers(x0.clone(), _diffusers(shift, steps, _release_grid(steps)))
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() < 1e-6
    # diffusers' own grid samples a different trajectory: the release's grid matters
    other = _run_diffusers(x0.clone(), _diffusers(shift, steps))
    assert (ours - other).abs().max().item() > 1e-4


def test_shards_step_like_the_whole():
    x0 = _noise((1, 37, 16), seed=1)
    whole = _run_ours(x0.clone(), 10, 5.0)
    halves = [_run_ours(part.clone(), 10, 5.0) for part in x0.split((20, 17), dim=1)]
    assert torch.equal(torch.cat(halves, dim=1), whole)


def test_fresh_object_repeats_and_order_is_enforced():
    x0 = _noise(seed=2)
    assert torch.equal(_run_ours(x0.clone(), 5, 5.0), _run_ours(x0.clone(), 5, 5.0))
    s = FlowUniPC(steps=3, shift=5.0)
    t = s.timesteps()
    with pytest.raises(RuntimeError, match="expected i=0"):
        s.step(x0, velocity(x0, t[1:2]), 1)
    x = x0
    for i in range(3):
        x = s.step(x, velocity(x, t[i : i + 1]), i)
    with pytest.raises(RuntimeError, match="expected i=3|past the last"):
        s.step(x, velocity(x, t[:1]), 0)
    with pytest.raises(RuntimeError, match="past the last"):
        s.step(x, velocity(x, t[:1]), 3)


def test_one_step_returns_the_x0_prediction_in_the_input_dtype():
    x = _noise(seed=3).bfloat16()
    s = FlowUniPC(steps=1, shift=5.0)
    v = velocity(x.float(), s.timesteps()[:1])
    out = s.step(x, v, 0)
    assert out.dtype == torch.bfloat16
    x0 = x.float() - torch.tensor(s.sigmas()[0].item(), dtype=torch.float32) * v
    assert torch.equal(out, x0.bfloat16())
