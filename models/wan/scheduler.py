"""Wan2.1's default sampler: flow-matching UniPC (order 2, B(h) = expm1, predicting x0).

Same duck-typed API as ``models.scheduler.FlowMatchEuler`` (``sigmas()``, ``timesteps()``,
``step(x, v, i)``), but multistep: the object remembers the last two x0 predictions and the last
sample, so a fresh ``FlowUniPC`` is needed per video and ``step`` must see i = 0, 1, 2, ...

Release vs diffusers (read from wan/utils/fm_solvers_unipc.py and diffusers'
UniPCMultistepScheduler with use_flow_sigmas=True, as WanPipeline configures it):
- Same solver: x0 = x - sigma * v; UniP predictor then UniC corrector (the corrector at step i
  refines the sample the model saw at step i, using that step's x0), order 2 with a 1st-order
  warm-up at step 0 and a 1st-order last step (lower_order_final), rho = 1/2 for the order-2
  predictor and the order-1 corrector, all coefficients computed from float32 sigmas in float32.
- Same last step: sigma_N = 0, so the last update returns the (corrected) x0 prediction.
- Same timesteps rounding: sigma * 1000 in float64, truncated to int64 (the model gets integers).
- Different sigmas. The release's unshifted grid is linspace(s_max, 0, N + 1)[:-1] with
  s_max = float32(0.999) (its training table's first sigma); diffusers' is
  linspace(1, 0.001, N + 1)[:-1], then (after the shift, which maps 1 to 1) its first sigma is
  lowered to 1 - 1e-6. So diffusers' grid sits 1/1000 above the release's, and its first sigma
  is 0.999999 against the release's shift(0.999). Timesteps differ by up to 4 (50 steps,
  shift 5: 27 of 50 differ; the last one is 92 in the release, 96 in diffusers).
- Passing the release's grid to diffusers (``set_timesteps(sigmas=...)``) reproduces the release
  exactly; the tests check that, and the default-grid difference above.
We follow the release, but not its failure at >= 251 steps (shift 5; 501 at shift 3): there its
first two int timesteps coincide, its timestep lookup starts at index 1 and its last step has no
sigma left; we always start at index 0 (as diffusers' pipeline does). The release steps inside a
bf16 autocast; that changes nothing here: its einsums have one coefficient, so they run as an fp32
product, not a matmul (checked under CPU autocast; einsum's lowering does not depend on the device).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NUM_TRAIN_TIMESTEPS = 1000
SOLVER_ORDER = 2


@dataclass
class _RunState:
    """What a multistep run remembers between steps (fp32, the shape of the stepped x)."""

    next_index: int = 0
    x0_preds: list[torch.Tensor] = field(default_factory=list)  # the last SOLVER_ORDER, oldest first
    last_sample: torch.Tensor | None = None  # the sample the last predictor started from


def _lam(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR of the flow path x = (1 - sigma) x0 + sigma noise (fp32 0-d in and out)."""
    return torch.log(1 - sigma) - torch.log(sigma)


@dataclass(frozen=True, kw_only=True)
class FlowUniPC:
    """The release's FlowUniPCMultistepScheduler (shift=1 at init, then set_timesteps(steps,
    shift=shift)) as a frozen config plus per-run state. ``step`` is elementwise in x, so a
    sequence-parallel rank steps only its token shard (with its own FlowUniPC)."""

    steps: int
    shift: float = 5.0
    _sig32: torch.Tensor = field(init=False, repr=False, compare=False)
    _state: _RunState = field(default_factory=_RunState, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.shift <= 0:
            raise ValueError(f"flow shift must be > 0, got {self.shift}")
        sig = torch.cat([self._shifted(), torch.zeros(1, dtype=torch.float64)]).float()
        object.__setattr__(self, "_sig32", sig)

    def _shifted(self) -> torch.Tensor:
        """float64 `[steps]`: the release's unshifted grid, shifted (before any rounding)."""
        # The release's grid starts at its training table's first sigma, which it stores in fp32.
        top = torch.tensor(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS, dtype=torch.float32).double()
        # i * step + start, as numpy's linspace computes it (torch.linspace rounds differently,
        # and a last-bit change can move an int-truncated timestep).
        grid = torch.arange(self.steps + 1, dtype=torch.float64) * ((0.0 - top) / self.steps) + top
        grid = grid[:-1]
        return self.shift * grid / (1 + (self.shift - 1) * grid)

    def sigmas(self) -> torch.Tensor:
        """`[steps + 1]` float64 (the release's float32 values, exactly), ending in 0."""
        return self._sig32.double()

    def timesteps(self) -> torch.Tensor:
        """`[steps]` float32: the integers the release hands the model (sigma x 1000, truncated)."""
        return (self._shifted() * NUM_TRAIN_TIMESTEPS).to(torch.int64).float()

    def order(self, i: int) -> int:
        """The predictor's order at step i: 1 to warm up, 1 at the last step, else SOLVER_ORDER."""
        return min(SOLVER_ORDER, self.steps - i, i + 1)

    def step(self, x: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor:
        """x at sigma_i `[...]` and the velocity v there `[...]` -> x at sigma_{i+1}, in x's dtype.

        Computed in fp32 (the release's latents and coefficients). Step i first corrects x with
        this step's x0 prediction (UniC, i > 0), then predicts (UniP) from the corrected x."""
        st = self._state
        if i != st.next_index:
            raise RuntimeError(
                f"FlowUniPC.step called with i={i}, expected i={st.next_index}: steps must run 0, 1, 2, ... "
                "in order, with a fresh FlowUniPC per video"
            )
        if i >= self.steps:
            raise RuntimeError(f"FlowUniPC.step: i={i} is past the last of {self.steps} steps")
        sample, vel = x.float(), v.float()
        x0 = sample - self._sig32[i] * vel
        if i > 0:
            sample = self._correct(st.last_sample, x0, i)
        st.x0_preds = (st.x0_preds + [x0])[-SOLVER_ORDER:]
        st.last_sample = sample
        out = self._predict(sample, i)
        st.next_index = i + 1
        return out.to(x.dtype)

    def _coeffs(self, t: int, s0: int):
        """sigma_t / sigma_s0, alpha_t, h_phi_1 = expm1(-h), -h and B(h) for a step from sigma_s0
        to sigma_t (fp32 0-d). At sigma_t = 0, h = inf and h_phi_1 = B(h) = -1: x0 comes out."""
        sig = self._sig32
        hh = _lam(sig[s0]) - _lam(sig[t])  # -h: the x0-predicting form
        h_phi_1 = torch.expm1(hh)
        return sig[t] / sig[s0], 1 - sig[t], h_phi_1, hh, h_phi_1  # "bh2": B(h) = expm1(-h)

    def _rk(self, si: int, s0: int, t: int) -> torch.Tensor:
        """An earlier node's log-SNR distance from s0, in units of the step's h."""
        sig = self._sig32
        return (_lam(sig[si]) - _lam(sig[s0])) / (_lam(sig[t]) - _lam(sig[s0]))

    def _predict(self, sample: torch.Tensor, i: int) -> torch.Tensor:
        """UniP from sigma_i to sigma_{i+1}; m0 = this step's x0 (the newest prediction)."""
        ratio, alpha_t, h_phi_1, _, b_h = self._coeffs(i + 1, i)
        m0 = self._state.x0_preds[-1]
        out = ratio * sample - alpha_t * h_phi_1 * m0
        if self.order(i) == 2:
            d1 = (self._state.x0_preds[-2] - m0) / self._rk(i - 1, i, i + 1)
            out = out - alpha_t * b_h * (0.5 * d1)  # rho = 1/2: the order-2 UniP weight
        return out

    def _correct(self, last: torch.Tensor, x0_now: torch.Tensor, i: int) -> torch.Tensor:
        """UniC: redo the step from sigma_{i-1} to sigma_i with x0 at sigma_i known, at the order
        the previous predictor used; m0 = the previous step's x0."""
        order = self.order(i - 1)
        ratio, alpha_t, h_phi_1, hh, b_h = self._coeffs(i, i - 1)
        m0 = self._state.x0_preds[-1]
        out = ratio * last - alpha_t * h_phi_1 * m0
        d1_t = x0_now - m0
        if order == 1:
            return out - alpha_t * b_h * (0.5 * d1_t)
        rk = self._rk(i - 2, i - 1, i)
        rho = self._corrector_weights(rk, hh, b_h)
        d1 = (self._state.x0_preds[-2] - m0) / rk
        return out - alpha_t * b_h * (rho[0] * d1 + rho[1] * d1_t)

    @staticmethod
    def _corrector_weights(rk: torch.Tensor, hh: torch.Tensor, b_h: torch.Tensor) -> torch.Tensor:
        """Order-2 UniC weights: solve [[1, 1], [rk, 1]] rho = g, with g_k = k! phi_{k+1}(hh) / B(h)
        (phi via the recursion phi_{k+1} = (phi_k - 1/k!) / hh, phi_1 = expm1(hh) / hh)."""
        phi = torch.expm1(hh) / hh - 1
        g = []
        fact = 1
        for k in (1, 2):
            g.append(phi * fact / b_h)
            fact *= k + 1
            phi = phi / hh - 1 / fact
        one = torch.ones_like(rk)
        lhs = torch.stack([torch.stack([one, one]), torch.stack([rk, one])])
        return torch.linalg.solve(lhs, torch.stack(g))
