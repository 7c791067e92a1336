"""Wan2.1 through the family seam: `torchrun ... -m launcher generate --preset wan-tiny` on 2 and 4
CPU processes (gloo) equals the single-process run, for every factorisation and for cfg 2 (Wan
runs classic CFG by default: two forwards per step). CPU, fp32, gloo.
"""

import json

import pytest

from test_distributed_generate import assert_same_videos, run_launcher

pytestmark = pytest.mark.multiprocess
WAN = ("--preset", "wan-tiny", "--prompt", "a red fox", "--size", "48x80", "--frames", "5")  # 2x3x5 = 30 tokens: uneven on 4 ranks


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("wan-single")
    proc = run_launcher(out, *WAN)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("nproc, flags, label, cfg", [
    (2, ("--cfg", "1"), "2x1", 1),
    (2, ("--cfg", "1", "--ulysses", "1", "--ring", "2"), "1x2", 1),
    (2, (), "1x1", 2),  # the default on 2 ranks: the CFG passes in parallel
    (4, (), "2x1", 2),
    (4, ("--cfg", "1", "--ulysses", "2", "--ring", "2"), "2x2", 1),
], ids=["2x1", "1x2", "cfg2", "cfg2-2x1", "2x2"])
def test_wan_parallel_equals_single_process(tmp_path, single, nproc, flags, label, cfg):
    proc = run_launcher(tmp_path, *WAN, *flags, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_videos(single, tmp_path, rtol=1e-5)
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    topo = record["topology"]
    assert (f"{topo['ulysses']}x{topo['ring']}", topo["cfg"]) == (label, cfg)
    assert record["model"]["family"] == "wan" and record["cfg_scale"] == 5.0 and record["negative_prompt"]
