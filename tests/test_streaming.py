"""Layer streaming (parallel/streaming.py, parallel/placement.py): a model whose blocks stream
from host memory computes exactly what the resident model computes; N ranks share one host copy."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import models
from launcher.memory_plan import Placement
from launcher.pipeline import build_dit
from parallel.placement import meta_copy, place_blocks
from parallel.streaming import BlockLayout, HostStore, LayerStreamer, open_host_store
from test_distributed_generate import run_launcher


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("shift", torch.randn(width))

    def forward(self, x):
        return self.norm(torch.tanh(self.fc(x)) + self.shift)


def _toy(n=5, width=24):
    torch.manual_seed(0)
    return nn.Sequential(*(Block(width) for _ in range(n))).eval()


def test_layout_is_aligned_and_round_trips():
    block = Block(24).to(torch.bfloat16)
    layout = BlockLayout.of(block)
    assert all(s.offset % 256 == 0 for s in layout.slots)
    assert {s.name for s in layout.slots} == {"weight", "bias", "shift"}
    flat = torch.zeros(layout.nbytes, dtype=torch.uint8)
    layout.write(flat)
    for s, v in zip(layout.slots, layout.views(flat)):
        assert torch.equal(v, getattr(s.owner, s.name))


@pytest.mark.parametrize("prefetch", [1, 2, 4])
@pytest.mark.parametrize("streamed", [1, 3, 5])
def test_streamed_model_equals_resident(prefetch, streamed):
    model = _toy()
    x = torch.randn(3, 24)
    with torch.no_grad():
        want = model(x)
    blocks = [(str(i), b) for i, b in enumerate(model)]
    placed = place_blocks(blocks, device=torch.device("cpu"), streamed=streamed, prefetch=prefetch,
                          materialise=lambda name, m: m, structure=lambda name, m: m.to("meta"))
    try:
        assert placed.host_kind == "pageable" and len(placed.streamed) == streamed
        for b in model[len(model) - streamed:]:  # between calls, tensors point at the host store
            assert b.fc.weight.data_ptr() != 0 and not b.fc.weight.is_meta
        with torch.no_grad():
            for _ in range(3):  # cyclic: the next forward's first block was prefetched
                assert torch.equal(model(x), want)
    finally:
        placed.close()


def test_blocks_run_out_of_order_restart_the_pipeline():
    model = _toy(4)
    x = torch.randn(2, 24)
    with torch.no_grad():
        want = model[2](model[3](x))
    placed = place_blocks([(str(i), b) for i, b in enumerate(model)], device=torch.device("cpu"), streamed=4,
                          materialise=lambda name, m: m, structure=lambda name, m: m.to("meta"))
    with torch.no_grad():
        got = model[2](model[3](x))
    placed.close()
    assert torch.equal(got, want)


def test_meta_copy_shares_no_storage():
    block = Block(16)
    copy = meta_copy(block)
    assert all(p.is_meta for p in copy.parameters()) and not any(p.is_meta for p in block.parameters())
    assert [(s.dtype, s.shape) for s in BlockLayout.of(copy).slots] == [(s.dtype, s.shape) for s in BlockLayout.of(block).slots]


def test_streamer_rejects_bad_prefetch():
    store = HostStore(torch.zeros(256, dtype=torch.uint8), (0,), "pageable")
    with pytest.raises(ValueError, match="prefetch"):
        LayerStreamer([], [], store, torch.device("cpu"), prefetch=0)


def test_shared_store_needs_a_barrier():
    with pytest.raises(ValueError, match="barrier"):
        open_host_store([BlockLayout.of(Block(8))], lambda i, f: None, device=torch.device("cpu"), share_name="x")


@pytest.mark.parametrize("streamed", [0, 2, 4])
def test_dit_with_streamed_blocks_equals_build_model(streamed):
    """Random weights materialised block by block (init_random_ with the block's prefix) are the
    weights of a whole `build_model`, and the forward is bit-identical."""
    ref = models.build_model("tiny", dtype=torch.float32)
    model, placed = build_dit(models.get_family("tiny"), "tiny", None, torch.device("cpu"), torch.float32, Placement(streamed=streamed))
    try:
        c = ref.config
        grid = c.token_grid(64, 96, 9)
        n = grid[0] * grid[1] * grid[2]
        gen = torch.Generator().manual_seed(1)
        img = torch.randn(1, n, c.in_channels * 4, generator=gen)
        txt = torch.randn(1, 7, c.text_states_dim, generator=gen)
        mask = torch.ones(1, 7, dtype=torch.long)
        cos, sin = ref.rope(grid)
        args = (img, cos, sin, txt, mask, torch.tensor([500.0]), torch.randn(1, c.pooled_dim, generator=gen),
                torch.tensor([6000.0]))
        with torch.no_grad():
            want = ref(*args)
            for _ in range(2):
                assert torch.equal(model(*args), want)
    finally:
        placed.close()


PROMPT = ("--prompt", "a red fox in the snow")


def _latents(out: Path) -> torch.Tensor:
    (path,) = out.glob("*.latents.safetensors")
    return load_file(str(path))["latents"]


def _record(out: Path) -> dict:
    (path,) = [p for p in out.glob("*.json")]
    return json.loads(path.read_text())


@pytest.mark.multiprocess
def test_generate_streaming_two_ranks_share_one_host_copy(tmp_path):
    """2 ranks under torchrun stream 4 blocks from one /dev/shm store (written by local rank 0,
    mapped by both, unlinked once mapped) and give the single-process plain run's latents."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm on this machine")
    plain, streamed = tmp_path / "plain", tmp_path / "streamed"
    proc = run_launcher(plain, *PROMPT)
    assert proc.returncode == 0, proc.stderr
    before = set(os.listdir("/dev/shm"))
    proc = run_launcher(streamed, *PROMPT, "--stream-blocks", "3", nproc=2)
    assert proc.returncode == 0, proc.stderr
    rel = ((_latents(plain) - _latents(streamed)).norm() / _latents(plain).norm()).item()
    assert rel < 1e-5, rel
    memory = _record(streamed)["memory"]
    assert memory["used"]["streamed_blocks"] == 3 and memory["host_store"] == "shared"
    assert not {n for n in set(os.listdir("/dev/shm")) - before if n.startswith("launcher-")}, "store left behind"


@pytest.mark.slow
def test_generate_streaming_single_process_is_exact(tmp_path):
    plain, streamed = tmp_path / "plain", tmp_path / "streamed"
    for out, extra in ((plain, ()), (streamed, ("--stream-blocks", "4", "--prefetch", "2"))):
        proc = run_launcher(out, *PROMPT, *extra)
        assert proc.returncode == 0, proc.stderr
    assert torch.equal(_latents(plain), _latents(streamed))
    assert _record(streamed)["memory"]["host_store"] == "pageable"


@pytest.mark.slow
def test_out_of_memory_falls_back_once_and_says_so(tmp_path, monkeypatch):
    """The first placement runs out of memory: the job rebuilds the DiT with the fallback plan,
    finishes, logs it and records it; the latents equal a plain run's."""
    import dataclasses

    import launcher.job as job
    from launcher.__main__ import main
    from launcher.memory_plan import estimate

    resolve_job, denoise_all = job.resolve_job, job._denoise_all
    calls = []

    def with_fallback(cfg, **kwargs):
        resolved = resolve_job(cfg, **kwargs)
        fallback = estimate(_tiny_shape(resolved.dit), Placement(streamed=4))
        return dataclasses.replace(resolved, memory=dataclasses.replace(resolved.memory, fallback=fallback))

    def oom_first(j, plan, *args):
        calls.append(plan.placement.streamed)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return denoise_all(j, plan, *args)

    monkeypatch.setattr(job, "resolve_job", with_fallback)
    monkeypatch.setattr(job, "_denoise_all", oom_first)
    out = tmp_path / "fallback"
    argv = ["generate", "--preset", "tiny", "--steps", "2", "--seed", "7", "--save-latents", "--device", "cpu",
            "--output-dir", str(out),
            "--prompt", PROMPT[1]]
    assert main(argv) == 0
    assert calls == [0, 4]
    memory = _record(out)["memory"]
    assert memory["used"]["streamed_blocks"] == 4 and "out of memory" in memory["fallback_after_oom"]
    plain = tmp_path / "plain"
    monkeypatch.undo()
    assert main([*argv[:-3], str(plain), "--prompt", PROMPT[1]]) == 0
    assert torch.equal(_latents(plain), _latents(out))


def _tiny_shape(dit):
    from launcher.memory_plan import JobShape

    return JobShape(preset="tiny", dit=dit, height=64, width=96, frames=9, dtype="fp32", world=1, dp=1,
                    cfg_degree=1, ulysses=1, ring=1, text_llm=False)


@pytest.mark.slow
def test_fp8_blocks_stream_like_any_other():
    """FP8 storage with every block streamed computes exactly what FP8 resident does, and stays
    within FP8's error of the plain model (tolerance as tests/test_fp8.py states for the DiT)."""
    cpu = torch.device("cpu")
    plain, _ = build_dit(models.get_family("tiny"), "tiny", None, cpu, torch.float32, Placement())
    resident, _ = build_dit(models.get_family("tiny"), "tiny", None, cpu, torch.float32, Placement(fp8="storage"))
    streamed, placed = build_dit(models.get_family("tiny"), "tiny", None, cpu, torch.float32, Placement(fp8="storage", streamed=4))
    c = plain.config
    grid = c.token_grid(64, 96, 9)
    gen = torch.Generator().manual_seed(3)
    img = torch.randn(1, grid[0] * grid[1] * grid[2], c.in_channels * 4, generator=gen)
    args = (img, *plain.rope(grid), torch.randn(1, 5, c.text_states_dim, generator=gen), torch.ones(1, 5),
            torch.tensor([700.0]), torch.randn(1, c.pooled_dim, generator=gen), torch.tensor([6000.0]))
    try:
        with torch.no_grad():
            want, fp8 = plain(*args), resident(*args)
            assert torch.equal(streamed(*args), fp8)
        assert type(streamed.double_blocks[0].img_attn_qkv).__name__ == "Float8Linear"
        assert ((fp8 - want).norm() / want.norm()).item() < 8e-2
    finally:
        placed.close()


@pytest.mark.slow
def test_generate_fp8_from_a_release_model_dir(tmp_path):
    """--fp8 storage quantises the release's bf16 checkpoint while loading it; the run finishes
    and its latents stay near the bf16 run's."""
    from tiny_checkpoints import write_release_ckpts

    ckpts = tmp_path / "ckpts"
    write_release_ckpts(ckpts)
    runs = {}
    for name, extra in (("bf16", ()), ("fp8", ("--fp8", "storage", "--stream-blocks", "2"))):
        out = tmp_path / name
        proc = run_launcher(out, *PROMPT, "--model-dir", str(ckpts), *extra)
        assert proc.returncode == 0, proc.stderr
        runs[name] = _latents(out)
    rel = ((runs["fp8"] - runs["bf16"]).norm() / runs["bf16"].norm()).item()
    assert 0 < rel < 5e-2, rel
