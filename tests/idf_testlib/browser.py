"""Debian's chromium, headless, driving the ComfyUI frontend (1.32.9) of a test server.

Playwright only drives the browser: ``executable_path`` is the system chromium that
``tools/host.py test`` installs with apt-get, so Playwright never downloads one. Host
names other than loopback resolve to nothing, so the page cannot reach the internet.
"""
import re
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]
#: The frontend silently ignores a ``?template=`` or ``&source=`` value outside this pattern.
TEMPLATE_NAME = re.compile(r"[a-zA-Z0-9_-]+")
#: The dialog ``app.showMissingNodesError`` opens (dialog key "global-missing-nodes").
MISSING_NODES_DIALOG = '[role="dialog"][aria-labelledby="global-missing-nodes"]'
#: A toast of severity "error", e.g. "Template ... not found".
ERROR_TOAST = ".p-toast-message-error"
#: The app is up and a ``?template=`` has been handled: its loader strips the parameter when done.
APP_SETTLED = "() => Boolean(window.app?.graph) && !new URLSearchParams(location.search).has('template')"
#: Let Vue render what the last load queued (two animation frames).
NEXT_FRAMES = "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"
LOAD_TIMEOUT_MS = 90_000


@contextmanager
def launch_chromium():
    """A Playwright ``Browser`` on Debian's chromium, with a fresh temporary profile."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class FrontendPage:
    """One page in a fresh browser context (own storage) that records uncaught page errors."""

    def __init__(self, browser, base_url: str):
        self.base_url = base_url
        self.context = browser.new_context(viewport={"width": 1440, "height": 900})
        self.page = self.context.new_page()
        self.page_errors: list[str] = []
        self.page.on("pageerror", lambda error: self.page_errors.append(str(error)))

    def open(self, path: str = "/") -> None:
        """Navigate and wait until the app has its graph and has handled any template parameter."""
        self.page.goto(self.base_url + path)
        self.page.wait_for_function(APP_SETTLED, timeout=LOAD_TIMEOUT_MS)
        self.page.evaluate(NEXT_FRAMES)

    def open_template(self, name: str, source: str) -> None:
        """Open a pack's example workflow the way a user's link does: ``/?template=<name>&source=<pack>``."""
        self.open(f"/?template={name}&source={source}")

    def load_graph(self, workflow: dict, name: str) -> None:
        """Load a workflow through the call the template loader makes (``app.loadGraphData``)."""
        self.page.evaluate(
            "([workflow, name]) => window.app.loadGraphData(workflow, true, true, name, {openSource: 'template'})",
            [workflow, name])
        self.page.evaluate(NEXT_FRAMES)

    def node_types(self) -> list[str]:
        """The type of every node on the canvas's root graph."""
        return self.page.evaluate("() => window.app.graph._nodes.map(node => node.type)")

    def registered_node_types(self) -> set[str]:
        """Every node type the frontend can build (from /object_info and its own front-end nodes)."""
        return set(self.page.evaluate("() => Object.keys(window.LiteGraph.registered_node_types)"))

    def problems(self) -> list[str]:
        """What a user would see go wrong: page errors, the missing-nodes dialog, unknown nodes, error toasts."""
        found = [f"page error: {error}" for error in self.page_errors]
        dialog = self.page.locator(MISSING_NODES_DIALOG)
        if dialog.count():
            found.append("missing-nodes dialog: " + " ".join(dialog.first.inner_text().split()))
        known = self.registered_node_types()
        found += [f"node type unknown to the frontend: {kind}" for kind in self.node_types() if kind not in known]
        found += ["error toast: " + " ".join(text.split()) for text in self.page.locator(ERROR_TOAST).all_inner_texts()]
        return found

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))

    def close(self) -> None:
        self.context.close()
