"""Hybrid Ulysses x Ring attention on 2 and 4 gloo processes against the single-process
reference, for every factorisation ulysses x ring of the world size (fp32, relative error < 1e-5).

Each test spawns its processes once and loops over factorisations and cases inside them: process
start-up is the expensive part on a 2-core machine."""

import pytest
import torch

from mp_util import run_ranks

pytestmark = pytest.mark.multiprocess

TOL = 1e-5
HEADS, HEAD_DIM = 8, 8  # 2 heads per rank at ulysses 4: head chunks of 1 head

# name -> (batch, valid image tokens, text tokens, valid text per item or None = no text tensors)
CASES = {
    "image_only": (2, 24, 0, None),
    "text_full": (2, 24, 6, (6, 6)),
    "text_padded": (2, 21, 6, (6, 2)),
    "text_uniform_image_padded": (1, 22, 5, (3,)),
    "text_zero_len_tiny_image": (2, 3, 5, (0, 4)),  # padding spans several ring chunks
    "text_empty": (1, 10, 0, (0,)),
}


def _inputs(batch, n, length, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = [torch.randn(batch, n, HEADS, HEAD_DIM, generator=g) for _ in range(3)]
    if lens is None:
        return img, [None] * 3, None
    txt = [torch.randn(batch, length, HEADS, HEAD_DIM, generator=g) for _ in range(3)]
    return img, txt, torch.tensor(lens, dtype=torch.long).reshape(batch)


def _poison_padding(shard, sp, n):
    """Padded rows may hold anything; fill them with huge values so a leak cannot hide."""
    start = sp.sp_rank * shard.shape[1]
    n_mine = max(0, min(shard.shape[1], n - start))
    shard[:, n_mine:] = 1e4
    return shard


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _run_case(attn_cls, sp, case, **kw):
    from parallel.local import local_joint_attention
    from parallel.sequence import gather_tokens, shard_tokens

    batch, n, length, lens = CASES[case]
    img, txt, txt_lens = _inputs(batch, n, length, lens)
    ref_img, ref_txt = local_joint_attention(*img, *txt, txt_lens)
    attn = attn_cls(sp, num_valid_tokens=n, **kw)
    shards = [_poison_padding(shard_tokens(x, 1, sp), sp, n) for x in img]
    img_out, txt_out = attn(*shards, *txt, txt_lens)
    assert torch.isfinite(img_out).all(), f"{case}: non-finite image output (padded rows included)"
    full = gather_tokens(img_out, 1, sp, n)
    result = {"case": case, "img_err": _rel(full, ref_img), "txt": txt_out}
    if txt_out is not None and length:
        result["txt_err"] = _rel(txt_out, ref_txt)
        result["txt_pad_zero"] = bool((txt_out * ~_valid(txt_lens, length)[:, :, None, None] == 0).all())
    return result


def _valid(lens, length):
    return torch.arange(length)[None, :] < lens[:, None]


def _all_factorisations(rank, world, heads):
    from parallel.attention import HybridAttention
    from parallel.mesh import build_parallel_mesh
    from parallel.topology import Topology
    from parallel.sequence import SequenceParallel
    from parallel.topology import sp_factorisations

    out = []
    for u, r in sp_factorisations(world, heads):
        sp = SequenceParallel.from_mesh(build_parallel_mesh(Topology(ring=r, ulysses=u)))
        # Pure Ulysses also in 2 head chunks (the pipelined all-to-alls of the fused text path).
        for chunks in (1, 2) if r == 1 and u > 1 else (1,):
            for case in CASES:
                res = _run_case(HybridAttention, sp, case, check_inputs="always", head_chunks=chunks)
                out.append({"u": u, "r": r, "chunks": chunks, **res})
    return out


def _assert_results(per_rank):
    for row in zip(*per_rank, strict=True):  # the same (u, r, case) on every rank
        tag = f"u{row[0]['u']}r{row[0]['r']} chunks {row[0].get('chunks', 1)} {row[0]['case']}"
        for res in row:
            assert res["img_err"] < TOL, f"{tag}: image rel err {res['img_err']:.2e}"
            if "txt_err" in res:
                assert res["txt_err"] < TOL, f"{tag}: text rel err {res['txt_err']:.2e}"
                assert res["txt_pad_zero"], f"{tag}: padded text rows not zero"
        txts = [res["txt"] for res in row]
        if txts[0] is not None:
            # the text stream must stay bit-identical across ranks
            assert all(torch.equal(t, txts[0]) for t in txts), f"{tag}: text output differs across ranks"
        else:
            assert all(t is None for t in txts)


@pytest.mark.parametrize("world", [2, 4])
def test_every_factorisation_matches_single_process(world):
    per_rank = run_ranks(_all_factorisations, world, args=(HEADS,), timeout=150)
    combos = {(res["u"], res["r"], res["chunks"]) for res in per_rank[0]}
    assert combos == {(u, world // u, 1) for u in (1, 2, 4) if world % u == 0} | {(world, 1, 2)}
    _assert_results(per_rank)


def _yunchang(rank, world):
    from parallel.baselines import YunchangAttention
    from parallel.mesh import build_parallel_mesh
    from parallel.topology import Topology
    from parallel.sequence import SequenceParallel

    out = []
    for u, r in ((1, world), (world, 1)):
        sp = SequenceParallel.from_mesh(build_parallel_mesh(Topology(ring=r, ulysses=u)))
        for case in ("image_only", "text_full"):
            res = _run_case(YunchangAttention, sp, case, attn_type="lse:math")
            out.append({"u": u, "r": r, **res})
    return out


def test_yunchang_backend_matches_single_process():
    pytest.importorskip("yunchang")
    _assert_results(run_ranks(_yunchang, 2, timeout=120))


def _mesh_layout(rank, world):
    import torch.distributed as dist

    from parallel.mesh import MeshAxis, build_parallel_mesh
    from parallel.topology import Topology
    from parallel.sequence import SequenceParallel

    mesh = build_parallel_mesh(Topology(cfg=2, ring=1, ulysses=2))
    sp = SequenceParallel.from_mesh(mesh)
    ranks = {axis.value: dist.get_process_group_ranks(mesh.group(axis)) for axis in MeshAxis}
    ranks["sp"] = dist.get_process_group_ranks(mesh.group(MeshAxis.RING, MeshAxis.ULYSSES))
    mesh2 = build_parallel_mesh(Topology(ring=2, ulysses=2))
    sp2 = SequenceParallel.from_mesh(mesh2)
    ring = dist.get_process_group_ranks(mesh2.group("ring"))
    return ranks, mesh.device_mesh.mesh_dim_names, (sp.sp_rank, sp.sp_size), (sp2.sp_rank, sp2.ring_rank, ring)


def test_mesh_layout_keeps_ulysses_innermost():
    per_rank = run_ranks(_mesh_layout, 4, timeout=90)
    for rank, (ranks, names, sp, sp2) in enumerate(per_rank):
        assert names == ("dp", "cfg", "ring", "ulysses")
        assert ranks["ulysses"] == [rank - rank % 2, rank - rank % 2 + 1]  # adjacent ranks
        assert ranks["cfg"] == [rank % 2, rank % 2 + 2]
        assert ranks["ring"] == [rank] and ranks["dp"] == [rank]
        assert ranks["sp"] == ranks["ulysses"] and sp == (rank % 2, 2)
        # ring x ulysses = 2 x 2: sp rank = ring_rank * 2 + ulysses_rank = global rank
        assert sp2 == (rank, rank // 2, [rank % 2, rank % 2 + 2])


def _bad_inputs(rank, world):
    from parallel.attention import HybridAttention
    from parallel.mesh import build_parallel_mesh
    from parallel.topology import Topology
    from parallel.sequence import SequenceParallel

    sp = SequenceParallel.from_mesh(build_parallel_mesh(Topology(ulysses=2)))
    x = torch.randn(1, 4, 4, 8)
    t = torch.randn(1, 3, 4, 8)
    errors = {}
    scenarios = {
        # identical on every rank
        "heads": lambda: HybridAttention(sp)(*(torch.randn(1, 4, 3, 8) for _ in range(3)), None, None, None, None),
        "txt_lens": lambda: HybridAttention(sp)(x, x, x, t, t, t, torch.tensor([4])),
        # wrong on one rank only: the others must still raise, not wait in the all-to-all
        "one_rank_shard": lambda: HybridAttention(sp, num_valid_tokens=8)(*((x if rank == 0 else x[:, :3]),) * 3, t, t, t, torch.tensor([3])),
        "one_rank_text": lambda: HybridAttention(sp)(x, x, x, t, t, t, torch.tensor([3 - rank])),
    }
    for name, call in scenarios.items():
        try:
            call()
            errors[name] = None
        except ValueError as err:
            errors[name] = str(err)
    # the groups are still usable afterwards (no collective left half-done)
    img, txt = HybridAttention(sp)(x, x, x, t, t, t, torch.tensor([3]))
    return errors, tuple(img.shape), tuple(txt.shape)


def test_bad_input_raises_on_every_rank_without_hanging():
    per_rank = run_ranks(_bad_inputs, 2, timeout=60, pg_timeout=20)
    for errors, img_shape, txt_shape in per_rank:
        assert "ulysses 2 does not divide 3 heads" in errors["heads"]
        assert "txt_lens [4] must lie in [0, 3]" in errors["txt_lens"]
        assert "SP rank 1: image shard has 3 tokens, but 8 valid tokens over 2 ranks need 4" in errors["one_rank_shard"]
        assert "inputs differ across SP ranks" in errors["one_rank_text"]
        assert (img_shape, txt_shape) == ((1, 4, 4, 8), (1, 3, 4, 8))


def test_head_chunks_from_the_environment_must_be_a_positive_integer(monkeypatch):
    from parallel.attention import HybridAttention
    from parallel.sequence import SequenceParallel

    monkeypatch.setenv("LAUNCHER_ULYSSES_CHUNKS", "3")
    assert HybridAttention(SequenceParallel.single()).head_chunks == 3
    assert HybridAttention(SequenceParallel.single(), head_chunks=2).head_chunks == 2  # the argument wins
    for bad in ("0", "two"):
        monkeypatch.setenv("LAUNCHER_ULYSSES_CHUNKS", bad)
        with pytest.raises(ValueError, match=f"LAUNCHER_ULYSSES_CHUNKS must be a positive integer, got '{bad}'"):
            HybridAttention(SequenceParallel.single())
