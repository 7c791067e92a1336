"""`python -m launcher plan`: topology choice, token counts, memory estimate, CLI output and errors.
Config-tier tests: no process group, no weights, no GPU."""

from __future__ import annotations

import argparse
import json
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from launcher.config import ConfigError
from launcher.memory_estimate import GIB, dit_activations
from launcher.plan import add_plan_args, make_plan, run_plan
from models.hunyuan_video import get_preset
from models.hunyuan_video.blocks import DoubleStreamBlock, SingleStreamBlock
from models.hunyuan_video.vae_memory import VAE_DECODE_MEASURED_GIB, vae_decode_bytes, vae_tile, vae_tiling_config
from parallel.topology import Topology, TopologyError

RELEASE_PARAMS = 12_821_012_544


def cli(*argv: str, capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add_plan_args(parser)
    rc = run_plan(parser.parse_args(list(argv)))
    out, err = capsys.readouterr()
    return rc, out, err


def degrees(plan) -> list[tuple[int, int, int, int]]:
    return [(t.dp, t.cfg, t.ring, t.ulysses) for t in plan.topologies]


# ---------------------------------------------------------------------------------------------
# Topology and tokens
# ---------------------------------------------------------------------------------------------


def test_720p_on_4_gpus_takes_the_table_default():
    plan = make_plan(height=720, width=1280, frames=129, gpus=4)
    assert degrees(plan) == [(1, 1, 1, 4), (1, 1, 2, 2), (1, 1, 4, 1)]  # 4x1, 2x2, 1x4
    assert plan.topology == Topology(ulysses=4, ring=1)
    assert plan.chosen.source == "table" and plan.chosen.entry.default == (4, 1)
    assert "row 720x1280x129 on 4 sequence-parallel GPUs" in plan.reason
    assert plan.latent_grid == (33, 90, 160) and plan.token_grid == (33, 45, 80)
    assert plan.image_tokens == 33 * 45 * 80 == 118_800
    assert (plan.tokens_per_rank, plan.padded_tokens, plan.pad_tokens) == (29_700, 118_800, 0)
    assert plan.text_tokens == 256


def test_544p_on_8_gpus_has_no_row_and_splits_evenly():
    plan = make_plan(height=544, width=960, frames=129, gpus=8)
    assert plan.chosen.source == "rule" and plan.topology == Topology(ulysses=8, ring=1)
    assert plan.image_tokens == 33 * 34 * 60 == 67_320
    assert (plan.tokens_per_rank, plan.padded_tokens, plan.pad_tokens) == (8_415, 67_320, 0)  # 8 x 8,415


def test_uneven_token_counts_are_padded_at_the_end():
    plan = make_plan(height=544, width=960, frames=129, gpus=16)  # 67,320 / 16 = 4,207.5
    assert (plan.tokens_per_rank, plan.padded_tokens, plan.pad_tokens) == (4_208, 67_328, 8)
    plan = make_plan(height=720, width=1280, frames=129, gpus=7)  # 7 divides no head count of 24
    assert degrees(plan) == [(1, 1, 7, 1)]
    assert (plan.tokens_per_rank, plan.pad_tokens) == (16_972, 7 * 16_972 - 118_800)


def test_5_gpus_and_24_heads_allow_only_ring_5():
    plan = make_plan(height=720, width=1280, frames=129, gpus=5)
    assert degrees(plan) == [(1, 1, 5, 1)] and plan.topology.sp_label == "1x5"
    assert plan.chosen.source == "table"


def test_cfg_and_dp_take_their_share_of_the_gpus():
    plan = make_plan(height=720, width=1280, frames=129, gpus=8, cfg=2)
    assert degrees(plan) == [(1, 2, 1, 4), (1, 2, 2, 2), (1, 2, 4, 1)]
    assert plan.topology == Topology(cfg=2, ulysses=4) and plan.chosen.source == "table"  # the 4-GPU row
    assert plan.tokens_per_rank == 29_700
    plan = make_plan(height=720, width=1280, frames=129, gpus=8, cfg=2, dp=2)
    assert degrees(plan) == [(2, 2, 1, 2), (2, 2, 2, 1)] and plan.tokens_per_rank == 59_400


def test_explicit_degrees_win_and_are_explained():
    plan = make_plan(height=720, width=1280, frames=129, gpus=8, ring=2)
    assert plan.topology == Topology(ulysses=4, ring=2) and plan.chosen.source == "explicit"
    assert plan.reason == "explicit override --ring 2"


def test_a_preset_with_other_heads_uses_the_rule_not_the_table():
    plan = make_plan(preset="tiny", height=720, width=1280, frames=129, gpus=4)  # a table row, 24 heads
    assert plan.heads == 8 and plan.chosen.source == "rule" and plan.topology.ulysses == 4
    assert plan.memory.vae_decode is None and "no measurements" in plan.memory.notes[0]


def test_bad_input_raises_with_generates_messages():
    with pytest.raises(TopologyError, match=r"ulysses 5 does not divide 24 heads; valid: 1x5"):
        make_plan(height=720, width=1280, frames=129, gpus=5, ulysses=5)
    with pytest.raises(TopologyError, match=r"not divisible by cfg 2 x dp 1"):
        make_plan(height=720, width=1280, frames=129, gpus=5, cfg=2)
    with pytest.raises(ConfigError, match=r"--frames 128: the VAE needs 4n\+1 frames; nearest valid: 125 or"):
        make_plan(height=720, width=1280, frames=128, gpus=4)
    with pytest.raises(ConfigError, match=r"--gpus 0"):
        make_plan(height=720, width=1280, frames=129, gpus=0)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def test_release_weights_in_each_dtype():
    for dtype, nbytes in (("bf16", 2), ("fp16", 2), ("fp32", 4)):
        mem = make_plan(height=720, width=1280, frames=129, gpus=4, dtype=dtype).memory
        assert mem.dit_params == RELEASE_PARAMS and mem.dit_weights == RELEASE_PARAMS * nbytes
    assert round(RELEASE_PARAMS * 2 / GIB, 2) == 23.88


def test_activations_shrink_with_more_gpus_while_weights_stay():
    plans = [make_plan(height=720, width=1280, frames=129, gpus=g) for g in (1, 2, 4, 8)]
    acts = [p.memory.activations.peak for p in plans]
    assert acts == sorted(acts, reverse=True) and len(set(acts)) == 4
    assert {p.memory.dit_weights for p in plans} == {RELEASE_PARAMS * 2}
    # The image part of the activations splits; the 256 text tokens stay on every rank.
    assert acts[0] / acts[3] == pytest.approx((118_800 + 256) / (14_850 + 256))


def release_activations(s: int, *, ulysses: int = 1, ring: int = 1, dtype_bytes: int = 2, chunk: int | None = None):
    return dit_activations(image_tokens=s, text_tokens=256, hidden=3072, mlp_hidden=12288,
                           ulysses=ulysses, ring=ring, dtype_bytes=dtype_bytes, chunk_tokens=chunk)


def test_activation_formula_by_hand():
    c, m, s, n_txt, b = 3072, 12288, 29_700, 256, 2
    n = s + n_txt
    est = release_activations(s, ulysses=4)
    assert est.token_phase == b * n * 15 * c  # the q/k/v projection with its fp32 norm and RoPE temporaries
    assert est.attention_phase == b * n * 6 * c + 9 * b * s * c  # + the all-to-all's 3 x 3 buffers
    assert est.peak == est.token_phase and est.peak_phase == "token-wise"
    ring = release_activations(s, ring=4)
    assert ring.attention_phase == b * n * 6 * c + (4 * b + 3 * b + 4) * s * c  # 4: the fp32 accumulator
    chunked = release_activations(s, ulysses=4, chunk=4096)
    assert chunked.token_phase == b * max(4 * n * c + 17 * 4096 * c, 3 * n * c + 4096 * (3 * c + 2 * m))
    assert chunked.attention_phase == b * (4 * s + 6 * n_txt) * c + 9 * b * s * c  # the text is one chunk
    assert chunked.peak_phase == "attention"
    # A chunk as large as the sequence is no chunk (the blocks run it whole).
    assert release_activations(s, chunk=s) == release_activations(s)


class LiveBytes(TorchDispatchMode):
    """Bytes of tensors alive during the ops run under it (meta tensors work: no memory). Outputs
    of aliasing ops (views) share their input's storage and are not counted again. ``widest``:
    the most tokens (dim 1) of any tensor made whose last dim is ``width``."""

    def __init__(self, width: int = 0):
        super().__init__()
        self.live = self.peak = self.widest = 0
        self.width = width

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if all(r.alias_info is None for r in func._schema.returns):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    n = t.untyped_storage().nbytes()
                    self.live += n
                    weakref.finalize(t, self._free, n)
                    if t.dim() == 3 and t.shape[-1] == self.width:
                        self.widest = max(self.widest, t.shape[1])
        self.peak = max(self.peak, self.live)
        return out


def trace_block(block_cls, s: int, n_txt: int, chunk: int | None = None):
    """One release-width block forward in bf16 on the meta device with a fused attention (outputs
    only, no workspace): (peak bytes of the token-wise parts, before and after the attention call;
    bytes alive at the call; the most tokens of any [B, tokens, M] tensor), the inputs included."""
    cfg = get_preset("hunyuan-video-13b")
    with torch.device("meta"):
        block = block_cls(cfg).to(torch.bfloat16)
        img = torch.empty(1, s, cfg.hidden_size, dtype=torch.bfloat16)
        txt = torch.empty(1, n_txt, cfg.hidden_size, dtype=torch.bfloat16)
        vec = torch.empty(1, cfg.hidden_size, dtype=torch.bfloat16)
        cos = sin = torch.empty(s, cfg.head_dim)
    inputs = img.nbytes + txt.nbytes
    mode, before = LiveBytes(cfg.mlp_hidden), []

    def attention(iq, ik, iv, tq, tk, tv, lens):
        before.append((mode.peak, mode.live))
        out = torch.empty_like(iq), torch.empty_like(tq)
        mode.peak = 0  # from here: the token-wise parts after attention
        return out

    with torch.no_grad(), mode:
        block(img, txt, vec, cos, sin, torch.tensor([n_txt]), attention, chunk=chunk)
    (peak_before, at_call), peak_after = before[0], mode.peak
    return max(peak_before, peak_after) + inputs, at_call + inputs, mode.widest


@pytest.mark.parametrize("block_cls", [SingleStreamBlock, DoubleStreamBlock])
@pytest.mark.parametrize("chunk", [None, 1024])
def test_activation_formula_matches_the_blocks_live_tensors(block_cls, chunk):
    """The token-wise and held-at-attention terms against the tensors the model code really holds
    (traced on the meta device): upper bounds within 3%. Chunked, no [tokens, M] tensor (the
    MLP's hidden) ever holds more than one chunk."""
    s, n_txt, c, b = 8192, 256, 3072, 2
    est = release_activations(s, chunk=chunk)
    token_wise, at_attention, widest = trace_block(block_cls, s, n_txt, chunk)
    assert token_wise <= est.token_phase <= 1.03 * token_wise
    held = est.attention_phase - 4 * b * s * c  # less the steady attention buffers
    assert 0.999 * at_attention <= held <= 1.03 * at_attention  # neglected: the modulation vectors [1, 6C]
    assert widest <= (chunk or s) + 16


def test_chunks_bound_the_blocks_peak_by_attention():
    whole, chunked = (release_activations(118_800, chunk=c) for c in (None, 4096))
    assert chunked.peak == chunked.attention_phase and chunked.peak < whole.peak / 1.8


def test_vae_tiles_follow_the_tiling_rules():
    release, small = vae_tiling_config("release"), vae_tiling_config("small")
    assert vae_tiling_config("auto") == release and vae_tiling_config("off") is None
    assert vae_tile((33, 90, 160), release) == (17, 32, 32)
    assert vae_tile((33, 90, 160), small) == (17, 16, 16)
    assert vae_tile((9, 20, 40), release) == (9, 20, 32)  # short in time: not tiled in time; h clipped
    assert vae_tile((33, 90, 160), None) == (33, 90, 160)


def test_vae_model_bounds_every_measurement_from_above_within_12_percent():
    for latent, mode, gib in VAE_DECODE_MEASURED_GIB:
        ratio = vae_decode_bytes(latent, vae_tiling_config(mode)) / (gib * GIB)
        assert 1.0 <= ratio <= 1.12, (latent, mode, ratio)


def test_vae_decode_in_the_plan():
    mem = make_plan(height=720, width=1280, frames=129, gpus=4).memory
    assert mem.vae_tiling == "release" and mem.vae_tile == (17, 32, 32)
    assert mem.vae_weights == 246_478_803 * 2  # fp16 whatever --dtype
    assert mem.decode == mem.vae_weights + vae_decode_bytes((33, 90, 160), vae_tiling_config("release"))
    assert mem.writer_peak == max(mem.denoise, mem.decode)
    small = make_plan(height=720, width=1280, frames=129, gpus=4, vae_tiling="small").memory
    assert small.vae_decode < mem.vae_decode / 2
    off = make_plan(height=720, width=1280, frames=129, gpus=4, vae_tiling="off").memory
    assert off.vae_decode > mem.vae_decode and "extrapolated" in off.notes[0]


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def test_cli_table(capsys):
    rc, out, err = cli("--size", "720x1280", "--frames", "129", "--gpus", "4", capsys=capsys)
    assert rc == 0 and err == ""
    assert "  *   1    1     1        4   4x1" in out
    assert "by table configs/topology/hunyuan_video.yaml: row 720x1280x129" in out
    assert "118,800 image tokens" in out and "per rank: 29,700 image tokens" in out
    assert "DiT weights       23.88" in out


def test_cli_6gib_on_one_gpu_plans_with_token_chunks(capsys):
    rc, out, err = cli("--size", "384x512", "--frames", "129", "--gpus", "1", "--max-gpu-memory", "6GiB", capsys=capsys)
    assert rc == 0 and err == ""
    assert "token chunks of 4096" in out and "7 chunks of this rank's 25,344 image tokens" in out
    assert "no NCCL (one process)" in out and "text phase: not counted" in out
    rc, out, _ = cli("--size", "384x512", "--frames", "129", "--gpus", "1", "--max-gpu-memory", "6GiB",
                     "--with-text-encoder", "--json", capsys=capsys)
    chosen = json.loads(out)["memory_plan"]["chosen"]
    assert rc == 0 and chosen["stream_text"] and chosen["text_phase_bytes"] <= 6 * GIB
    assert chosen["chunk_tokens"] == 4096 and chosen["runtime_overhead_bytes"]["nccl"] == 0


def test_cli_json_has_the_plans_numbers(capsys):
    argv = ("--model", "hunyuan-video-13b", "--size", "544x960", "--frames", "129", "--gpus", "16", "--json")
    rc, out, _ = cli(*argv, capsys=capsys)
    assert rc == 0
    data = json.loads(out)
    plan = make_plan(height=544, width=960, frames=129, gpus=16)
    assert data["tokens"] == {"latent_grid": [33, 68, 120], "token_grid": [33, 34, 60], "image": 67_320,
                              "per_rank": 4_208, "padded": 67_328, "pad": 8, "text": 256}
    assert data["chosen"] == {"dp": 1, "cfg": 1, "ring": 2, "ulysses": 8, "label": "8x2", "source": "rule",
                              "reason": plan.reason}
    assert [t["label"] for t in data["topologies"]] == ["8x2", "4x4", "2x8", "1x16"]
    mem = data["memory_bytes"]
    assert mem["dit_weights"] == RELEASE_PARAMS * 2
    assert mem["activations"] == plan.memory.activations.peak
    assert mem["writer_peak"] == plan.memory.writer_peak
    assert mem["denoise"] == mem["dit_weights"] + mem["activations"]


def test_cli_preset_alias_and_defaults(capsys):
    rc, out, _ = cli("--preset", "hunyuan-video-13b", "--gpus", "2", "--json", capsys=capsys)
    data = json.loads(out)
    assert rc == 0 and (data["height"], data["width"], data["frames"]) == (720, 1280, 129)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--gpus", "5", "--ulysses", "5"), "ulysses 5 does not divide 24 heads; valid: 1x5"),
        (("--gpus", "4", "--ulysses", "3"), "ulysses 3 does not divide the 4 sequence-parallel GPUs; valid"),
        (("--gpus", "2", "--size", "720x1000"), "width 1000 is not a positive multiple of 16; nearest valid"),
        (("--gpus", "2", "--size", "720p"), "--size '720p': expected HEIGHTxWIDTH"),
        (("--gpus", "2", "--frames", "128"), "the VAE needs 4n+1 frames; nearest valid: 125 or 129"),
        (("--gpus", "2", "--model", "nope"), "--preset 'nope' is unknown"),
    ],
)
def test_cli_errors_exit_2(capsys, argv, message):
    rc, out, err = cli(*argv, capsys=capsys)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and message in err
