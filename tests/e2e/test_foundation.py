"""The real ComfyUI server over HTTP, with the pack loaded by ComfyUI's own custom-node
loader: it imports cleanly, registers exactly the pack's nodes, documents every one of
them (inputs and outputs), answers on its route, and the host samples an image with the pack installed."""
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from idf_testlib.models import SD15_CHECKPOINT
from idf_testlib.paths import HOST, PACK, PACK_LINK, ROOT
from idf_testlib.server import execution_error

#: ``RELATIVE_PYTHON_MODULE`` the loader gives every node of the pack (``python_module`` in /object_info).
PACK_MODULE = f"custom_nodes.{PACK}"
#: A line of the loader's summary, e.g. "   0.1 seconds (IMPORT FAILED): /path/custom_nodes/IDFusion"
#: (newer hosts put the level first: "[INFO]    0.1 seconds: ...").
IMPORT_TIME_LINE = re.compile(r"^(?:\[\w+\])?\s*([\d.]+) seconds( \(IMPORT FAILED\))?: (.+)$", re.MULTILINE)
TRACEBACK_FRAME = re.compile(r'^\s*File "([^"]+)", line \d+', re.MULTILINE)
#: ComfyUI logs this once custom nodes are loaded; what follows are prompts other tests run.
SERVER_STARTED = "Starting server"


def is_pack_file(path: str) -> bool:
    """Whether a traceback frame's file belongs to the pack (through the host's link or the checkout)."""
    path = Path(path)
    return path.is_relative_to(PACK_LINK) or (path.is_relative_to(ROOT) and not path.is_relative_to(HOST))


def pack_import_problems(log: str) -> list[str]:
    """What the server's start-up log says went wrong loading the pack: a failed import or a traceback through it."""
    log = log.split(SERVER_STARTED, 1)[0]
    problems = []
    imports = {Path(path): failed for _, failed, path in IMPORT_TIME_LINE.findall(log)}
    if PACK_LINK not in imports:
        problems.append(f"the loader's import summary does not list {PACK_LINK}")
    elif imports[PACK_LINK]:
        problems.append(f"the loader reports IMPORT FAILED for {PACK_LINK}")
    frames = sorted(set(TRACEBACK_FRAME.findall(log)))
    problems += [f"traceback through {path}" for path in frames if is_pack_file(path)]
    problems += [line.strip() for line in log.splitlines() if f"comfy_entrypoint in {PACK_LINK}" in line]
    return problems


@pytest.fixture(scope="module")
def pack_nodes(server) -> dict:
    """/object_info entries of the pack's nodes, by node id."""
    return {name: info for name, info in server.object_info().items() if info["python_module"] == PACK_MODULE}


def documentation_problems(node_id: str, info: dict) -> list[str]:
    """What a node's /object_info entry lacks for a user browsing the menu, hovering an input or
    reading an output: category, display name, description, input tooltips, output names and tooltips."""
    problems = []
    if not info["category"].startswith(f"{PACK}/"):
        problems.append(f"category {info['category']!r} is not under '{PACK}/'")
    if not (info.get("display_name") or "").startswith(PACK):
        problems.append(f"display name {info.get('display_name')!r} does not start with '{PACK}'")
    if not (info.get("description") or "").strip():
        problems.append("no description")
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            options = spec[1] if len(spec) > 1 else {}
            if not (options.get("tooltip") or "").strip():
                problems.append(f"{section} input {name!r} has no tooltip")
    names, tooltips = info.get("output_name") or [], info.get("output_tooltips") or []
    for slot, kind in enumerate(info["output"]):
        name = names[slot] if slot < len(names) else None
        if not (name or "").strip() or name.strip().lower() == kind.lower():
            problems.append(f"output {slot} ({kind}) shows only its type: give it a display_name saying what it is")
        if not (tooltips[slot] if slot < len(tooltips) else None):
            problems.append(f"output {slot} ({name or kind}) has no tooltip")
    return [f"{node_id}: {problem}" for problem in problems]


def test_pack_imports_without_errors(server):
    assert pack_import_problems(server.log_text()) == []


def test_server_registers_exactly_the_pack_nodes(host, pack_nodes):
    from IDFusion.nodes import NODES
    declared = {node.GET_SCHEMA().node_id for node in NODES}
    assert declared, "the pack registered no nodes (IDFusion.nodes.NODES is empty)"
    assert set(pack_nodes) == declared


def test_every_pack_node_is_documented(pack_nodes):
    assert pack_nodes, "the pack registered no nodes (none in /object_info has python_module custom_nodes.IDFusion)"
    problems = [problem for node_id, info in sorted(pack_nodes.items())
                for problem in documentation_problems(node_id, info)]
    assert problems == []


def test_documentation_check_catches_a_bare_output():
    """Proof the check above can fail: an output shown only by its type, or without a tooltip, is reported."""
    info = {"category": f"{PACK}/faces", "display_name": f"{PACK} Probe", "description": "A probe.",
            "input": {"required": {}}, "output": ["IMAGE", "MASK"], "output_name": ["IMAGE", "position mask"],
            "output_tooltips": ["Crops.", None]}
    assert documentation_problems("Probe", info) == [
        "Probe: output 0 (IMAGE) shows only its type: give it a display_name saying what it is",
        "Probe: output 1 (position mask) has no tooltip"]


def test_stats_route_answers(server):
    stats = server.get("/idfusion/stats")
    assert isinstance(stats, dict) and stats, f"/idfusion/stats answered {stats!r}"


def sd15_prompt(checkpoint: str, prefix: str) -> dict:
    """Text to image with core nodes only: 64×64, 2 steps, saved as PNG."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a portrait photo of a person", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 0, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def test_two_step_prompt_saves_a_64px_png(sd15_checkpoint, server, artifacts):
    entry = server.run(sd15_prompt(SD15_CHECKPOINT, "idfusion_e2e"))
    assert execution_error(entry) is None
    images = server.output_images(entry)
    assert len(images) == 1 and images[0].is_file(), f"SaveImage reported {images}"
    shutil.copy(images[0], artifacts / "e2e-sd15-64px.png")
    with Image.open(images[0]) as image:
        assert (image.format, image.size) == ("PNG", (64, 64))
        image.verify()
