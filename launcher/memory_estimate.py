"""The DiT's activation memory on one rank, from shapes alone (no GPU, no process group), the
runtime overhead a process holds beside it, and the per-phase breakdown `plan` prints.

The memory planner (``launcher/memory_plan.py``) is the one memory model: it adds the weights
(resident and streamed, from the family's blocks on the meta device), these activations, FP8
buffers, the VAE decode (the family's VAE model, ``models.family.VaeSpec``), the text encoders and
the runtime overhead (by world size, below). All for inference (no autograd state) and batch 1 per rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.chunking import token_spans

GIB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


# What a process holds on the GPU outside its tensors, by case. N ranks, measured on 4 x H200
# (docs/BENCHMARKS.md, memory placements): 2.2 GiB outside the caching allocator once the process
# group is up (CUDA context, NCCL communicators); NCCL_ALLOWANCE more by the end of a step (NCCL
# connects its peers' buffers lazily, at the first all-to-all: 2.32 GiB measured, outside the
# allocator's cap); the allocator's slack (reserved over allocated: 1.2 GiB under a cap with fixed
# segments, which is why a budget turns on expandable segments). One process: no process group,
# so no NCCL at all; its CUDA context (with the cuBLAS and cuDNN kernels loaded) measured 0.68 GiB
# outside the allocator in a plain run and 0.81 GiB under a budget on one H200
# (scripts/gpu_lowmem_bench.sh, its "outside" column; docs/BENCHMARKS.md). Each rounded up.
CONTEXT_OVERHEAD = int(2.25 * GIB)
NCCL_ALLOWANCE = int(2.5 * GIB)
SINGLE_CONTEXT = int(1.0 * GIB)
ALLOCATOR_SLACK = int(1.0 * GIB)


@dataclass(frozen=True)
class RuntimeOverhead:
    """Bytes per rank outside the planned tensors: the CUDA context (with NCCL's communicators on
    N ranks), NCCL's lazily connected peer buffers (0 for one process) and the allocator's slack."""

    context: int
    nccl: int
    slack: int

    @property
    def total(self) -> int:
        return self.context + self.nccl + self.slack

    def note(self) -> str:
        nccl = f", NCCL peers {self.nccl / GIB:.2f}" if self.nccl else ", no NCCL (one process)"
        return (f"runtime overhead {self.total / GIB:.2f} GiB per rank (CUDA context {self.context / GIB:.2f}"
                f"{nccl}, allocator slack {self.slack / GIB:.2f})")

    def to_dict(self) -> dict:
        return {"context": self.context, "nccl": self.nccl, "slack": self.slack, "total": self.total}


def runtime_overhead(world: int) -> RuntimeOverhead:
    """The allowance for a job of ``world`` processes: one process never starts NCCL."""
    if world == 1:
        return RuntimeOverhead(SINGLE_CONTEXT, 0, ALLOCATOR_SLACK)
    return RuntimeOverhead(CONTEXT_OVERHEAD, NCCL_ALLOWANCE, ALLOCATOR_SLACK)


@dataclass(frozen=True, kw_only=True)
class ActivationEstimate:
    """Peak live activation bytes of one DiT forward on one rank, in its two candidate phases:
    the token-wise parts (norms, projections, MLP; chunked or not) and the attention call."""

    token_phase: int
    attention_phase: int
    chunk_tokens: int | None = None

    @property
    def peak(self) -> int:
        return max(self.token_phase, self.attention_phase)

    @property
    def peak_phase(self) -> str:
        return "token-wise" if self.token_phase >= self.attention_phase else "attention"


def dit_activations(
    *,
    image_tokens: int,
    text_tokens: int,
    hidden: int,
    mlp_hidden: int,
    ulysses: int,
    ring: int,
    dtype_bytes: int,
    chunk_tokens: int | None = None,
) -> ActivationEstimate:
    """Live activations at the widest point of one DiT block, an upper bound of the tensors held.

    S = image tokens on this rank (padding included), N = S + L with L the text tokens (whole on
    every rank), C = hidden size, M = MLP hidden size (4C), b = bytes per element, T = the largest
    token chunk (N unchunked); terms in b x C (tokens x width). Fitted to the blocks' live tensors
    (tests/test_plan.py traces both block kinds on the meta device; the two peak alike):

    token-wise, before attention (modulated norm, the q/k/v projection, fp32 RMSNorm and RoPE
    temporaries): unchunked 15 N; chunked 4 N (the block input and the q, k, v being filled) + 17 T.
    token-wise, after attention (output projection, the MLP): unchunked (4C + 2M) N; chunked
    3 N (input, attention output, the block output being filled) + (3C + 2M) T.
    attention: what the block holds at the call (a stream run whole: 6 x its tokens for the input,
    q/k/v projection, q and k after RoPE; cut in chunks: 4 x) plus the larger of two sets of
    attention buffers (a chunk [U*S, H/U, D] holds S*C elements):
        all-to-all (U > 1):  9 b S C  (q, k, v each in send, receive and output buffers at once)
        steady:              4 b S C  (q, k, v in the attention layout; the output)
                  + if R > 1: 3 b S C + 4 S C  (next K/V chunk in flight; this step's partial;
                                                the fp32 log-sum-exp accumulator [U*S, H/U, D])

    Neglected (< 1%): RoPE tables 2 S D fp32, text head slices L C / U, kernel workspaces, the
    sampler's [S, 64] fp32 latents. The attention terms were checked on an H200 (the blocks of
    hunyuan-video-2block, one process, fused SDPA, S = 14,850 to 118,800: 0.1-0.7% below).
    """
    s, n, c, m, b = image_tokens, image_tokens + text_tokens, hidden, mlp_hidden, dtype_bytes
    img_spans, txt_spans = token_spans(s, chunk_tokens), token_spans(text_tokens, chunk_tokens)  # as blocks cut
    chunked = len(img_spans) > 1
    if chunked:
        t = max(span.stop - span.start for span in img_spans + txt_spans)
        token_phase = b * max(4 * n * c + 17 * t * c, 3 * n * c + t * (3 * c + 2 * m))
    else:
        token_phase = b * n * max(15 * c, 4 * c + 2 * m)
    # A stream cut in chunks holds its q, k, v in whole buffers; one run whole holds them as made.
    held = b * c * sum(k * (4 if len(spans) > 1 else 6) for k, spans in ((s, img_spans), (text_tokens, txt_spans)))
    all_to_all = 9 * b * s * c if ulysses > 1 else 0
    steady = 4 * b * s * c + ((3 * b + 4) * s * c if ring > 1 else 0)
    return ActivationEstimate(token_phase=token_phase, attention_phase=held + max(all_to_all, steady),
                              chunk_tokens=chunk_tokens if chunked else None)


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """The memory plan's per-rank bytes of the two phases of a job, without the runtime overhead:
    denoise (every rank) and decode (the first rank of each dp replica, after the DiT is freed).
    ``dit_weights``: what of the DiT is on the GPU (resident blocks, streaming slots, FP8 buffers);
    ``vae_*`` are None for a VAE with no calibration."""

    dit_params: int
    dit_weights: int
    activations: ActivationEstimate
    vae_tiling: str
    vae_tile: tuple[int, int, int]
    vae_weights: int | None
    vae_decode: int | None
    notes: tuple[str, ...] = ()
    step_cache: int = 0  # what a step cache holds (image streams of this rank's tokens)

    @property
    def denoise(self) -> int:
        return self.dit_weights + self.activations.peak + self.step_cache

    @property
    def decode(self) -> int | None:
        return None if self.vae_decode is None else self.vae_weights + self.vae_decode

    @property
    def writer_peak(self) -> int:
        """The first rank of a dp replica: the larger of its two phases."""
        return max(self.denoise, self.decode or 0)
