"""Debian's chromium, headless, driving the ComfyUI frontend of a test server.

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
#: How the frontend reports node types it cannot build: a dialog up to frontend 1.3x (dialog key
#: "global-missing-nodes"), a notice above the canvas in newer ones ("Missing node: <type>").
MISSING_NODES_DIALOG = '[role="dialog"][aria-labelledby="global-missing-nodes"]'
MISSING_NODES_NOTICE = re.compile(r"^Missing nodes?:")
#: Any open dialog (e.g. the Templates dialog), a template's card in it, the Run button.
DIALOG = '[role="dialog"]'
TEMPLATE_CARD = '[data-testid="template-workflow-{name}"]'
RUN_BUTTON = '[data-testid="queue-button"]'
#: What the frontend shows above the canvas when a workflow names missing models or images.
ERRORS_FOUND = re.compile(r"\d+ errors? found")
#: The images the frontend holds for a node's last output (``app.nodeOutputs``), and whether they show.
OUTPUT_SHOWN = """(id) => {
    const images = window.app.nodeOutputs?.[id]?.images ?? [];
    const node = window.app.graph._nodes.find(n => String(n.id) === String(id));
    return images.length > 0 && (node.imgs ?? []).length > 0 && node.imgs.every(i => i.complete && i.naturalWidth > 0);
}"""
#: A toast of severity "error", e.g. "Template ... not found".
ERROR_TOAST = ".p-toast-message-error"
#: The app is up, has opened its start-up workflow (restored, blank or a template's: a graph loaded
#: before that is replaced) and has handled any ``?template=`` (its loader strips the parameter).
APP_SETTLED = ("() => Boolean(window.app?.graph && window.app.extensionManager?.workflow?.activeWorkflow)"
               " && !new URLSearchParams(location.search).has('template')")
#: Let Vue render what the last load queued (two animation frames).
NEXT_FRAMES = "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"
LOAD_TIMEOUT_MS = 90_000
#: The frontend's two renderers: litegraph's canvas (the default) and Vue nodes ("Nodes 2.0").
RENDERERS = ("canvas", "vue")
VUE_NODES_SETTING = "Comfy.VueNodes.Enabled"
#: Unset, the frontend treats the visitor as new and opens the Templates dialog by itself.
FIRST_VISIT_DONE = "Comfy.TutorialCompleted"
#: Every node's bounds as the frontend has them: [id, x, y, width, height], the title bar included.
NODE_BOUNDS = "() => window.app.graph._nodes.map(n => [n.id, ...Array.from(n.boundingRect)])"
#: Every node's size as the frontend has it: [id, width, height], without the title bar.
NODE_SIZES = "() => window.app.graph._nodes.map(n => [n.id, n.size[0], n.size[1]])"
#: Every image the page shows has finished loading (previews of Load Image and of outputs).
IMAGES_LOADED = "() => Array.from(document.images).every(img => img.complete)"


def skip_first_visit(server_url: str) -> None:
    """Mark the server's user as having seen the frontend, which otherwise opens the Templates dialog
    on a first visit (settings live on the server, per user)."""
    import requests
    requests.post(f"{server_url}/settings/{FIRST_VISIT_DONE}", json=True, timeout=30).raise_for_status()


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

    def open_from_templates_menu(self, name: str, source: str) -> None:
        """Open a pack's example workflow as a person does: the side bar's Templates button, the
        pack under Extensions, the workflow's card."""
        self.page.get_by_role("button", name="Templates", exact=True).click()
        dialog = self.page.locator(DIALOG)
        dialog.get_by_text(source, exact=True).first.click()
        dialog.locator(TEMPLATE_CARD.format(name=name)).click()
        self.page.wait_for_selector(DIALOG, state="detached", timeout=LOAD_TIMEOUT_MS)
        self.settle()

    def template_thumbnails(self, source: str) -> dict[str, dict]:
        """The cards the Templates dialog shows for a pack: name → {"served": HTTP status of the
        pack's picture for it (None if not asked for), "src" and "width" of the picture shown}."""
        served = {}
        prefix = f"/api/workflow_templates/{source}/"

        def record(response):
            path = response.url.split("?", 1)[0]
            if prefix in path and not path.endswith(".json"):
                served[path.rsplit("/", 1)[1].rsplit(".", 1)[0]] = response.status

        self.page.on("response", record)
        self.page.get_by_role("button", name="Templates", exact=True).click()
        dialog = self.page.locator(DIALOG)
        dialog.get_by_text(source, exact=True).first.click()
        self.settle()
        self.page.remove_listener("response", record)
        cards = dialog.locator('[data-testid^="template-workflow-"]')
        found = {}
        for i in range(cards.count()):
            card = cards.nth(i)
            name = card.get_attribute("data-testid").removeprefix("template-workflow-")
            shown = card.locator("img").first.evaluate("img => ({src: img.src, width: img.naturalWidth})")
            found[name] = {"served": served.get(name), **shown}
        self.page.keyboard.press("Escape")
        return found

    def errors_found(self) -> list[str]:
        """The frontend's "N errors found" notice (missing models or images), if shown."""
        return self.page.get_by_text(ERRORS_FOUND).all_inner_texts()

    def press_run(self, transform=None) -> dict:
        """Press Run; the prompt the frontend sends is recorded (and ``transform``ed on its way to the
        server, when given). Returns {"sent": prompt as sent, "status": HTTP status, "answer": JSON}."""
        import json
        exchange = {}

        def handle(route, request):
            body = json.loads(request.post_data)
            exchange["sent"] = body["prompt"]
            if transform is not None:
                body["prompt"] = transform(body["prompt"])
            response = route.fetch(post_data=json.dumps(body))
            exchange["status"], exchange["answer"] = response.status, response.json()
            route.fulfill(response=response)

        self.page.route("**/api/prompt", handle)
        try:
            self.page.locator(RUN_BUTTON).click()
            for _ in range(LOAD_TIMEOUT_MS // 100):
                if "answer" in exchange:
                    return exchange
                self.page.wait_for_timeout(100)
        finally:
            self.page.unroute("**/api/prompt")
        raise AssertionError(f"Run sent no prompt in {LOAD_TIMEOUT_MS // 1000} s; the page shows: "
                             + " | ".join(self.errors_found() + self.problems()))

    def wait_for_output(self, node_id: int, timeout_ms: int = LOAD_TIMEOUT_MS) -> None:
        """Until the frontend shows the images a node output in the last run."""
        self.page.wait_for_function(OUTPUT_SHOWN, arg=str(node_id), timeout=timeout_ms)
        self.settle()

    def load_graph(self, workflow: dict, name: str, source: str = "template") -> None:
        """Load a workflow through the call the frontend's loaders make (``app.loadGraphData``):
        ``source`` "template" as the Templates menu does (the frontend fits the view), another
        (e.g. "file") as opening a file does (the frontend keeps the saved view if it shows a node)."""
        self.page.evaluate(
            "([workflow, name, source]) => window.app.loadGraphData(workflow, true, true, name, {openSource: source})",
            [workflow, name, source])
        self.page.evaluate(NEXT_FRAMES)

    def view(self) -> dict:
        """The canvas view: {"scale", "offset", "visible": [x, y, width, height] in graph units}."""
        return self.page.evaluate("""() => {
            const canvas = window.app.canvas;
            canvas.ds.computeVisibleArea(canvas.viewport);
            return {scale: canvas.ds.scale, offset: Array.from(canvas.ds.offset),
                    visible: Array.from(canvas.visible_area)};
        }""")

    def use_renderer(self, renderer: str) -> None:
        """Switch between the canvas and Vue-node renderers (a user setting, applied live)."""
        enabled = "true" if renderer == "vue" else "false"
        self.page.evaluate(f"async () => {{ await window.app.ui.settings.setSettingValueAsync("
                           f"'{VUE_NODES_SETTING}', {enabled}) }}")
        self.settle()

    def settle(self) -> None:
        """Wait until images have loaded and the frontend has sized every node (a few frames)."""
        self.page.wait_for_load_state("networkidle")
        self.page.wait_for_function(IMAGES_LOADED, timeout=LOAD_TIMEOUT_MS)
        for _ in range(3):
            self.page.evaluate(NEXT_FRAMES)

    def node_bounds(self) -> dict[int, tuple[float, float, float, float]]:
        """Node id → (x, y, width, height) in graph units, title bar included, as the frontend draws it."""
        return {int(row[0]): tuple(row[1:]) for row in self.page.evaluate(NODE_BOUNDS)}

    def node_sizes(self) -> dict[int, tuple[float, float]]:
        """Node id → (width, height) in graph units, title bar excluded, as the frontend has sized it."""
        return {int(row[0]): (row[1], row[2]) for row in self.page.evaluate(NODE_SIZES)}

    def node_types(self) -> list[str]:
        """The type of every node on the canvas's root graph."""
        return self.page.evaluate("() => window.app.graph._nodes.map(node => node.type)")

    def registered_node_types(self) -> set[str]:
        """Every node type the frontend can build (from /object_info and its own front-end nodes)."""
        return set(self.page.evaluate("() => Object.keys(window.LiteGraph.registered_node_types)"))

    def problems(self) -> list[str]:
        """What a user would see go wrong: page errors, the missing-nodes dialog or notice, unknown nodes,
        error toasts."""
        found = [f"page error: {error}" for error in self.page_errors]
        dialog = self.page.locator(MISSING_NODES_DIALOG)
        if dialog.count():
            found.append("missing nodes: " + " ".join(dialog.first.inner_text().split()))
        found += ["missing nodes: " + text for text in self.page.get_by_text(MISSING_NODES_NOTICE).all_inner_texts()]
        known = self.registered_node_types()
        found += [f"node type unknown to the frontend: {kind}" for kind in self.node_types() if kind not in known]
        found += ["error toast: " + " ".join(text.split()) for text in self.page.locator(ERROR_TOAST).all_inner_texts()]
        return found

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))

    def close(self) -> None:
        self.context.close()


def overlaps(bounds: dict[int, tuple[float, float, float, float]]) -> list[tuple[int, int]]:
    """Pairs of nodes whose rectangles (x, y, width, height) share area."""
    items = sorted(bounds.items())
    found = []
    for i, (a, (ax, ay, aw, ah)) in enumerate(items):
        for b, (bx, by, bw, bh) in items[i + 1:]:
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                found.append((a, b))
    return found
