"""RoPE tables and the flow-matching schedule against values computed here from the formulas."""

import math

import pytest
import torch

from models.hunyuan_video.rope import apply_rope, rope_table
from models.scheduler import FlowMatchEuler


def _expected_row(t, h, w, axes=(16, 56, 56), theta=256.0):
    """cos and sin of one token at grid position (t, h, w), straight from the formula."""
    cos, sin = [], []
    for pos, d in zip((t, h, w), axes):
        for i in range(0, d, 2):
            angle = pos / theta ** (i / d)
            cos += [math.cos(angle)] * 2
            sin += [math.sin(angle)] * 2
    return torch.tensor(cos), torch.tensor(sin)


@pytest.mark.parametrize("pos", [(0, 0, 0), (1, 0, 0), (0, 3, 7), (32, 44, 79), (17, 20, 5)])
def test_rope_table_rows_match_formula(pos):
    grid = (33, 45, 80)
    cos, sin = rope_table(grid, (16, 56, 56), 256.0)
    assert cos.shape == (33 * 45 * 80, 128) and cos.dtype == torch.float32
    row = (pos[0] * grid[1] + pos[1]) * grid[2] + pos[2]  # t-major, then h, then w
    exp_cos, exp_sin = _expected_row(*pos)
    torch.testing.assert_close(cos[row], exp_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[row], exp_sin, atol=1e-6, rtol=0)


def test_apply_rope_rotates_adjacent_pairs():
    x = torch.randn(1, 3, 2, 4)
    angle = torch.tensor([0.3, 0.3, 1.1, 1.1]).expand(3, 4)
    out = apply_rope(x, angle.cos(), angle.sin())
    for j, a in ((0, 0.3), (2, 1.1)):
        x0, x1 = x[..., j], x[..., j + 1]
        torch.testing.assert_close(out[..., j], x0 * math.cos(a) - x1 * math.sin(a))
        torch.testing.assert_close(out[..., j + 1], x1 * math.cos(a) + x0 * math.sin(a))


def test_sigmas_shift7_50_steps():
    sched = FlowMatchEuler(steps=50, shift=7.0)
    sigmas = sched.sigmas()
    assert sigmas.shape == (51,)
    for i in (0, 1, 10, 25, 49, 50):
        t = 1 - i / 50
        assert sigmas[i].item() == pytest.approx(7 * t / (1 + 6 * t), abs=1e-12)
    assert sigmas[25].item() == pytest.approx(0.875)
    assert sigmas[0] == 1 and sigmas[-1] == 0
    assert torch.all(sigmas[1:] < sigmas[:-1])
    torch.testing.assert_close(sched.timesteps(), (sigmas[:-1] * 1000).float())


def test_euler_step_reaches_data_for_exact_velocity():
    # For x_t = (1 - s) x0 + s n, the true velocity is n - x0; Euler is then exact.
    sched = FlowMatchEuler(steps=7, shift=3.0)
    x0, n = torch.randn(5), torch.randn(5)
    x = n.clone()
    for i in range(7):
        x = sched.step(x, n - x0, i)
    torch.testing.assert_close(x, x0)


def test_scheduler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        FlowMatchEuler(steps=0)
    with pytest.raises(ValueError, match="shift"):
        FlowMatchEuler(steps=10, shift=0)
