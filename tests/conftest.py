import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Two cores on CI: intra-op threads beyond that only add contention, most of all in multi-process tests.
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def slurm_single(tmp_path_factory):
    """The single-process run that the multi-node tests (tests/test_slurm_*.py) compare with."""
    from test_distributed_generate import run_launcher
    from test_slurm_multinode import VIDEO

    out = tmp_path_factory.mktemp("single")
    proc = run_launcher(out, *VIDEO, seed=None)
    assert proc.returncode == 0, proc.stderr
    return out
