"""Fixtures of the e2e tier: a second server that never reuses reference features (what a freshly
started server computes). The shared server and ``prepared`` are in tests/conftest.py."""
import shutil

import pytest


@pytest.fixture(scope="session")
def fresh_server(server, prepared, tmp_path_factory):
    """A second server, with the feature cache off (IDFUSION_FEATURE_CACHE_MB=0): every reference pass
    is computed afresh, so each prompt gives the picture a freshly started server gives, whatever ran
    before. Started on first use; the inputs of ``server`` are copied into it. Tests POST /free to it
    after use: two servers holding full-size models at once need more memory than small machines have."""
    from idf_testlib.server import ComfyServer
    srv = ComfyServer(tmp_path_factory.mktemp("comfy-fresh"), name="e2e-fresh", env={"IDFUSION_FEATURE_CACHE_MB": "0"})
    for photo in (server.workdir / "input").iterdir():
        if photo.is_file():
            shutil.copy(photo, srv.workdir / "input" / photo.name)
    srv.start()
    yield srv
    srv.stop()
