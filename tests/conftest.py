"""Test tiers, by folder: unit (plain torch), host (ComfyUI in process), e2e (the ComfyUI
server over HTTP), browser (the frontend in headless chromium). All run by the README's
test command: ``python3 tools/host.py test``."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from idf_testlib.host import boot, register_pack  # noqa: E402
from idf_testlib.paths import ARTIFACTS  # noqa: E402

TIERS = ("unit", "host", "e2e", "browser")
# The host tiers first: a failure of the foundation reads first.
ORDER = {"unit": 0, "host": 1, "e2e": 2, "browser": 3}

register_pack()  # ``import IDFusion.attention`` works in every tier


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        tier = next((t for t in TIERS if t in parts), "unit")
        item.add_marker(getattr(pytest.mark, tier))
    items.sort(key=lambda it: ORDER.get(next((m.name for m in it.iter_markers() if m.name in ORDER), "unit"), 0))


@pytest.fixture(scope="session")
def host():
    """The real ComfyUI imported in process (CPU)."""
    boot()
    import torch
    torch.set_grad_enabled(False)
    yield
    torch.set_grad_enabled(True)


@pytest.fixture(scope="session")
def sd15_checkpoint(host):
    from idf_testlib.models import sd15_checkpoint
    return sd15_checkpoint()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One ComfyUI server for the e2e and browser tiers, with the pack loaded by its own loader."""
    from idf_testlib.server import ComfyServer
    srv = ComfyServer(tmp_path_factory.mktemp("comfy"), name="e2e").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def prepared(server, sd15_checkpoint):
    """The example workflows ready to run as shipped on the test server (idf_testlib/prepared.py):
    fixtures under their model file names, marker photos under the sample photos' names. Returns
    the widget overrides of the 2-core test host (small images, 2 steps) for ``workflows.to_api``."""
    from idf_testlib import prepared as ready
    from idf_testlib import workflows
    from idf_testlib.paths import comfy_version
    info = server.object_info()
    runnable = [name for name in workflows.names() if workflows.runs_on(name, comfy_version())]
    ready.link_models([workflows.to_api(workflows.load(name), info) for name in runnable])
    ready.place_photos(server.workdir / "input")
    return ready.affordable


@pytest.fixture(scope="session")
def dit_prepared(prepared):
    """The API prompt maker for the DiT workflows on the test server: ``(workflow, object_info) →
    prompt`` at the test host's sizes, CLIP-L in place of the text encoders (``prepared.finish``)."""
    from idf_testlib import prepared as ready
    from idf_testlib.workflows import to_api
    return lambda workflow, info: ready.finish(to_api(workflow, info, prepared))


@pytest.fixture(scope="session")
def artifacts():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
