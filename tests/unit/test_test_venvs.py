"""The test hosts' virtual environments (tools/host.py): torch and its CUDA libraries (about
5.5 GB) are installed once, in the shared torch venv, not again in each host's venv — two full
copies did not fit on a CI machine's disk."""
import os
import sys
import sysconfig
from pathlib import Path

import pytest
import torch


@pytest.fixture
def host_venv() -> Path:
    if "IDFUSION_HOST_DIR" not in os.environ:
        pytest.skip("not run through tools/host.py test")
    return Path(sys.prefix)


def test_torch_comes_from_the_shared_venv_and_no_host_venv_holds_a_copy(host_venv):
    hosts_dir = Path(os.environ["IDFUSION_HOST_DIR"]).resolve().parent
    shared = hosts_dir / "torch-venv"
    assert Path(torch.__file__).resolve().is_relative_to(shared.resolve())
    for venv in hosts_dir.glob("*/venv"):
        site = venv / Path(sysconfig.get_paths()["purelib"]).relative_to(sys.prefix)
        assert not (site / "torch").exists(), f"{venv} holds its own torch"
        assert not (site / "nvidia").exists(), f"{venv} holds its own CUDA libraries"
