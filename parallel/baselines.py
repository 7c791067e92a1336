"""Reference backends behind the joint-attention contract, for tests and side-by-side benchmarks:
yunchang's ``LongContextAttention`` (what xDiT builds on) and xfuser's
``xFuserLongContextAttention`` with ``joint_strategy="rear"`` (what the HunyuanVideo release runs).

Both libraries keep their process groups in a module-level singleton. We never rely on it: the
groups of our :class:`~parallel.sequence.SequenceParallel` are installed in the singleton only
while the attention object is constructed (its constructor copies them onto the instance), then
the old values are restored.

Limits (raised as ``NotImplementedError``): no image padding (valid tokens = shard * SP size) and
one valid text length for the whole batch; yunchang also needs that length divisible by the SP
size. They are references, not the product.
"""

from __future__ import annotations

import contextlib

import torch

from .comm import all_gather_stacked
from .kernels import select_kernel
from .sequence import SequenceParallel


@contextlib.contextmanager
def _yunchang_groups(sp: SequenceParallel):
    from yunchang.globals import PROCESS_GROUP

    saved = (PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG)
    PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG = sp.ulysses_group, sp.ring_group
    try:
        yield
    finally:
        PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG = saved


class _LsePlugin:
    """One of our kernels as a yunchang "attn_processor": yunchang's basic ring calls it as
    ``fn(q, k, v, dropout_p=, softmax_scale=, causal=, ...)`` and merges the returned
    ``(out [B, S, H, D], lse [B, H, S])``. Unlike yunchang's TORCH_MATH / TORCH_CUDNN types (zero
    LSE, wrong for ring > 1) this LSE is the true one, in float32."""

    def __init__(self, kernel_name: str):
        self.kernel_name = kernel_name
        self._kernel = None

    def __call__(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
        if causal or dropout_p:
            raise NotImplementedError("non-causal inference only")
        if self._kernel is None:
            _, self._kernel = select_kernel(self.kernel_name, q.device, q.dtype, q.shape[-1])
        return self._kernel(q, k, v, softmax_scale)


def _uniform_len(img_q, txt_q, txt_lens, n_valid, sp: SequenceParallel, backend: str) -> int:
    c = img_q.shape[1]
    if n_valid is not None and n_valid != c * sp.sp_size:
        raise NotImplementedError(f"{backend}: uneven image tokens ({n_valid} over {sp.sp_size} ranks)")
    if txt_q is None:
        return 0
    lens = set(txt_lens.tolist()) if txt_lens is not None else {txt_q.shape[1]}
    if len(lens) != 1:
        raise NotImplementedError(f"{backend}: text lengths differ across the batch: {sorted(lens)}")
    return lens.pop()


def _pad_text(txt: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, l, H, D]`` -> ``[B, length, H, D]`` with zero rows after the valid ones."""
    if txt.shape[1] == length:
        return txt
    out = txt.new_zeros((txt.shape[0], length, *txt.shape[2:]))
    out[:, : txt.shape[1]] = txt
    return out


class YunchangAttention:
    """yunchang 0.6.x ``LongContextAttention`` (USP) with joint text.

    Text: SP rank s appends valid text tokens ``[s*l/P, (s+1)*l/P)`` to its image shard; as the
    attention is non-causal, this permutation of the global sequence changes nothing, and every
    text token is a key exactly once. Text outputs are all-gathered over the SP group.

    ``attn_type``: a yunchang ``AttnType`` value ("torch_flash", "fa", ...) or ``"lse:<kernel>"``
    to plug one of our kernels (``parallel.kernels``) in with a true float32 LSE.
    """

    def __init__(self, sp: SequenceParallel, *, attn_type: str = "lse:auto", ring_impl_type: str = "basic", num_valid_tokens: int | None = None):
        from yunchang import LongContextAttention
        from yunchang.kernels import AttnType

        self.sp = sp
        self.num_valid_tokens = num_valid_tokens
        self.kernel_name = attn_type
        if attn_type.startswith("lse:"):
            kind, processor = None, _LsePlugin(attn_type[4:])  # None: yunchang then calls the processor
        else:
            kind, processor = AttnType.from_string(attn_type), None
        with _yunchang_groups(sp):
            self.attn = LongContextAttention(ring_impl_type=ring_impl_type, attn_type=kind, attn_processor=processor)

    def set_valid_tokens(self, n: int | None) -> None:
        self.num_valid_tokens = n

    @torch.no_grad()
    def __call__(self, img_q, img_k, img_v, txt_q=None, txt_k=None, txt_v=None, txt_lens=None):
        p = self.sp.sp_size
        n_txt = _uniform_len(img_q, txt_q, txt_lens, self.num_valid_tokens, self.sp, "yunchang")
        if n_txt % p:
            raise NotImplementedError(f"yunchang: {n_txt} valid text tokens do not split over {p} ranks")
        piece = n_txt // p
        sl = slice(self.sp.sp_rank * piece, (self.sp.sp_rank + 1) * piece)
        c = img_q.shape[1]
        q, k, v = (
            torch.cat([x, t[:, sl]], dim=1) if piece else x
            for x, t in ((img_q, txt_q), (img_k, txt_k), (img_v, txt_v))
        )
        out = self.attn(q, k, v, softmax_scale=img_q.shape[-1] ** -0.5, causal=False)
        if txt_q is None:
            return out[:, :c], None
        if not piece:
            return out[:, :c], torch.zeros_like(txt_q)
        gathered = all_gather_stacked(out[:, c:], self.sp.sp_group, p)  # [P, B, piece, H, D]
        b, _, h, d = txt_q.shape
        txt = gathered.permute(1, 0, 2, 3, 4).reshape(b, n_txt, h, d)
        return out[:, :c], _pad_text(txt, txt_q.shape[1])


class XFuserAttention:
    """xfuser 0.4.5 ``xFuserLongContextAttention`` (CUDA only) with ``joint_strategy="rear"``:
    every rank appends the whole valid text to its queries, text keys join the last ring step."""

    def __init__(self, sp: SequenceParallel, *, attn_type: str = "torch_cudnn", num_valid_tokens: int | None = None):
        from xfuser.core.long_ctx_attention import xFuserLongContextAttention
        from yunchang.kernels import AttnType

        self.sp = sp
        self.num_valid_tokens = num_valid_tokens
        self.kernel_name = attn_type
        with _yunchang_groups(sp):
            self.attn = xFuserLongContextAttention(attn_type=AttnType.from_string(attn_type))

    def set_valid_tokens(self, n: int | None) -> None:
        self.num_valid_tokens = n

    @torch.no_grad()
    def __call__(self, img_q, img_k, img_v, txt_q=None, txt_k=None, txt_v=None, txt_lens=None):
        n_txt = _uniform_len(img_q, txt_q, txt_lens, self.num_valid_tokens, self.sp, "xfuser")
        c = img_q.shape[1]
        if not n_txt:
            out = self.attn(None, img_q, img_k, img_v)
            return out, (None if txt_q is None else torch.zeros_like(txt_q))
        out = self.attn(
            None, img_q, img_k, img_v,
            joint_tensor_query=txt_q[:, :n_txt], joint_tensor_key=txt_k[:, :n_txt],
            joint_tensor_value=txt_v[:, :n_txt], joint_strategy="rear",
        )
        return out[:, :c], _pad_text(out[:, c:], txt_q.shape[1])
