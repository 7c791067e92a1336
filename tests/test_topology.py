"""Topology tables and degree rules: no process group."""

import os

import pytest
import yaml

from parallel.topology import (
    Topology,
    TopologyError,
    all_topologies,
    default_table_path,
    factorisations,
    load_topology_table,
    parse_sp,
    preferred_topology,
    sp_factorisations,
)

TABLE = default_table_path("hunyuan_video")


@pytest.fixture(scope="module")
def table():
    return load_topology_table(TABLE)


def write(tmp_path, data) -> str:
    path = tmp_path / "topo.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def minimal(**row):
    gpus = {4: {"default": "4x1", "published": ["4x1", "2x2"]}}
    entry = {"size": "720x1280", "frames": 129, "gpus": gpus}
    entry.update(row)
    return {"model": "m", "heads": 24, "entries": [entry]}


# --- degrees --------------------------------------------------------------------------------


def test_factorisations_prefer_largest_ulysses_dividing_heads():
    assert sp_factorisations(8, 24) == ((8, 1), (4, 2), (2, 4), (1, 8))
    assert sp_factorisations(5, 24) == ((1, 5),)
    assert sp_factorisations(6, 24) == ((6, 1), (3, 2), (2, 3), (1, 6))
    assert sp_factorisations(16, 24) == ((8, 2), (4, 4), (2, 8), (1, 16))
    assert [t.sp_label for t in factorisations(8, 24, cfg=2)] == ["4x1", "2x2", "1x4"]
    assert preferred_topology(16, 24) == Topology(ring=2, ulysses=8)


def test_all_topologies_cover_dp_and_cfg_and_multiply_to_world():
    tops = all_topologies(8, 24)
    assert all(t.world_size == 8 and 24 % t.ulysses == 0 for t in tops)
    assert Topology(cfg=2, ring=2, ulysses=2) in tops
    assert Topology(dp=8) in tops
    assert len(set(tops)) == len(tops) == 16


def test_topology_rejects_bad_degrees():
    with pytest.raises(TopologyError, match=r"cfg must be one of \[1, 2\]"):
        Topology(cfg=3)
    with pytest.raises(TopologyError, match="ring must be a positive integer"):
        Topology(ring=0)
    with pytest.raises(TypeError):
        Topology(1, 1)  # keyword-only
    with pytest.raises(TopologyError, match="does not divide 24 heads"):
        Topology(ulysses=5).check_heads(24)
    with pytest.raises(TopologyError, match="ULYSSESxRING"):
        parse_sp("4-2")
    assert parse_sp("4x2") == (4, 2)


# --- the shipped table ------------------------------------------------------------------------


def test_shipped_table_has_release_rows_and_defaults(table):
    assert table.heads == 24 and table.model == "hunyuan_video"
    e = table.lookup(height=720, width=1280, frames=129, gpus=8)
    assert e.published == ((8, 1), (4, 2), (2, 4), (1, 8)) and e.default == (8, 1)
    assert table.lookup(height=720, width=1280, frames=129, gpus=5).published == ((1, 5),)
    assert table.lookup(height=960, width=960, frames=129, gpus=6).default == (6, 1)
    assert table.lookup(height=720, width=720, frames=129, gpus=3).published == ((3, 1), (1, 3))
    assert table.lookup(height=832, width=1104, frames=129, gpus=6) is None  # up to 4 only
    # portrait uses the landscape row
    assert table.lookup(height=1280, width=720, frames=129, gpus=4) is table.lookup(height=720, width=1280, frames=129, gpus=4)


def test_resolve_default_rule_and_explicit(table):
    r = table.resolve(height=1280, width=720, frames=129, world_size=8)
    assert (r.topology, r.source) == (Topology(ulysses=8), "table")
    r = table.resolve(height=720, width=1280, frames=65, world_size=8)  # frames not listed
    assert (r.topology, r.source) == (Topology(ulysses=8), "rule")
    r = table.resolve(height=720, width=1280, frames=129, world_size=16)
    assert (r.topology, r.source) == (Topology(ring=2, ulysses=8), "rule")
    r = table.resolve(height=720, width=1280, frames=129, world_size=8, ring=2)
    assert (r.topology, r.source) == (Topology(ring=2, ulysses=4), "explicit")
    r = table.resolve(height=720, width=1280, frames=129, world_size=8, cfg=2)
    assert r.topology == Topology(cfg=2, ulysses=4)
    # explicit choices outside the release's list are fine as long as ulysses divides the heads
    r = table.resolve(height=720, width=1280, frames=129, world_size=6, ulysses=6)
    assert r.topology == Topology(ulysses=6)


def test_resolve_errors_name_file_job_and_valid_choices(table):
    with pytest.raises(TopologyError) as err:
        table.resolve(height=720, width=1280, frames=129, world_size=5, ulysses=5)
    assert str(err.value) == f"{TABLE}: 720x1280x129 on 5 GPUs: ulysses 5 does not divide 24 heads; valid: 1x5"
    with pytest.raises(TopologyError, match=r"ring 3 does not divide the 8 .*valid: 8x1, 4x2, 2x4, 1x8"):
        table.resolve(height=720, width=1280, frames=129, world_size=8, ring=3)
    with pytest.raises(TopologyError, match=r"4x4 uses 16 GPUs, not 8"):
        table.resolve(height=720, width=1280, frames=129, world_size=8, ulysses=4, ring=4)
    with pytest.raises(TopologyError, match=r"not divisible by cfg 2"):
        table.resolve(height=720, width=1280, frames=129, world_size=5, cfg=2)
    with pytest.raises(TopologyError, match=r"cfg must be one of"):
        table.resolve(height=720, width=1280, frames=129, world_size=8, cfg=4)


# --- loading errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, where, what",
    [
        ({"model": "m", "heads": 24}, "", "missing key(s) ['entries']"),
        ({**minimal(), "extra": 1}, "", "unknown key(s) ['extra']; valid: ['entries', 'heads', 'model']"),
        (minimal(size="720p"), "entries[0].size", "size must be HEIGHTxWIDTH"),
        (minimal(frames=-1), "entries[0].frames", "must be a positive integer"),
        (minimal(gpus={4: {"default": "4x1", "published": ["4x1", "3x1"]}}), "entries[0].gpus.4", "3x1 uses 3 GPUs, not 4; valid: 4x1, 2x2, 1x4"),
        (minimal(gpus={5: {"default": "5x1", "published": ["5x1"]}}), "entries[0].gpus.5", "ulysses 5 does not divide 24 heads; valid: 1x5"),
        (minimal(gpus={4: {"default": "1x4", "published": ["4x1"]}}), "entries[0].gpus.4.default", "1x4 is not among published 4x1"),
        (minimal(gpus={4: {"default": "4x1"}}), "entries[0].gpus.4", "missing key(s) ['published']"),
        (minimal(gpus={4: {"default": "4by1", "published": ["4x1"]}}), "entries[0].gpus.4.default", "ULYSSESxRING"),
    ],
)
def test_load_errors_name_file_and_key(tmp_path, data, where, what):
    path = write(tmp_path, data)
    with pytest.raises(TopologyError) as err:
        load_topology_table(path)
    msg = str(err.value)
    assert msg.startswith(path) and where in msg and what in msg, msg


def test_duplicate_rows_and_unreadable_files(tmp_path):
    data = minimal()
    data["entries"].append(dict(data["entries"][0]))
    with pytest.raises(TopologyError, match=r"entries\[1\]: duplicate row 720x1280x129 on 4 GPUs"):
        load_topology_table(write(tmp_path, data))
    with pytest.raises(TopologyError, match="cannot read"):
        load_topology_table(os.path.join(tmp_path, "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("entries: [\n")
    with pytest.raises(TopologyError, match="not valid YAML"):
        load_topology_table(str(bad))
