"""nodes/samples.py: the sample photos copied into an input folder once, never over a file that is
there, and a folder that cannot take them logged rather than raised (the start-up goes on)."""
import logging

import pytest


@pytest.fixture
def samples(host):
    from IDFusion.nodes import samples
    return samples


def test_each_sample_is_copied_once(samples, tmp_path):
    written = samples.install_samples(tmp_path)
    assert [p.name for p in written] == [p.name for p in samples.sample_files()]
    assert all((tmp_path / p.name).read_bytes() == p.read_bytes() for p in samples.sample_files())
    assert samples.install_samples(tmp_path) == []


def test_an_existing_file_is_never_replaced(samples, tmp_path):
    first = samples.sample_files()[0]
    (tmp_path / first.name).write_bytes(b"mine")
    written = samples.install_samples(tmp_path)
    assert (tmp_path / first.name).read_bytes() == b"mine"
    assert first.name not in [p.name for p in written] and len(written) == len(samples.sample_files()) - 1


def test_a_folder_that_cannot_take_them_is_logged(samples, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="IDFusion"):
        assert samples.install_samples(tmp_path / "no such folder") == []
    assert "could not copy the sample photo" in caplog.text


def test_a_copy_that_fails_half_way_leaves_no_file(samples, tmp_path):
    target = tmp_path / "idfusion_broken.png"
    with pytest.raises(OSError):
        samples._copy_new(tmp_path / "unreadable source.png", target)
    assert not target.exists()
