"""Fixtures of the browser tier: Debian's chromium and one page of the test server's frontend."""
import pytest

from idf_testlib.browser import CHROMIUM, FrontendPage, launch_chromium, skip_first_visit
from idf_testlib.paths import in_ci


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium; missing, it fails the run in CI and skips the tier elsewhere."""
    if not CHROMIUM.is_file():
        reason = f"{CHROMIUM} is missing: `python3 tools/host.py test` installs Debian's chromium (root, apt-get)"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    with launch_chromium() as chromium:
        yield chromium


@pytest.fixture
def frontend(browser, server):
    """A fresh page on the canvas renderer (settings live on the server: a test may have switched it)."""
    skip_first_visit(server.url)
    page = FrontendPage(browser, server.url)
    page.open("/")
    page.use_renderer("canvas")
    yield page
    page.close()
