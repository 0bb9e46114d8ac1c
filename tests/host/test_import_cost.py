"""Loading the pack in ComfyUI is cheap: in a fresh interpreter, after the host's own
imports, importing the pack and listing its nodes is quick and pulls in no face-analysis
library the host has not already imported (newer hosts import cv2 themselves).

The measured time is written to ``<artifacts>/import_time.txt``."""
import json
import subprocess

from idf_testlib.paths import COMFY, VENV_PY, ensure_pack_link

#: Libraries only a running face node may import.
HEAVY = ("insightface", "facexlib", "onnxruntime", "cv2")
#: Seconds the pack may add to ComfyUI's start-up (measured: about 0.05 s on 2 cores).
LOAD_BUDGET_S = 2.0

#: Runs in a fresh interpreter: argv = ComfyUI folder, the pack's folder in a custom_nodes folder.
PROBE = r"""
import asyncio, importlib.util, json, os, sys, time
comfy_dir, pack_dir, heavy = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
sys.path.insert(0, comfy_dir)
import comfy.options
comfy.options.enable_args_parsing(False)
from comfy.cli_args import args
args.cpu = True
import utils.extra_config, torch, execution, server, nodes, comfy_api.latest  # the host's imports, in main.py's order
import folder_paths, tempfile
input_dir = tempfile.TemporaryDirectory()
folder_paths.set_input_directory(input_dir.name)  # the entry point copies the sample photos there
before = set(sys.modules)
start = time.perf_counter()
name = pack_dir.replace(".", "_x_")  # as nodes.load_custom_node names a package folder
spec = importlib.util.spec_from_file_location(name, os.path.join(pack_dir, "__init__.py"))
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
imported = time.perf_counter()
extension = asyncio.run(module.comfy_entrypoint())
node_ids = [node.GET_SCHEMA().node_id for node in asyncio.run(extension.get_node_list())]
listed = time.perf_counter()
print(json.dumps({
    "import_s": imported - start, "load_s": listed - start, "nodes": len(node_ids),
    "new_modules": len(set(sys.modules) - before),
    "heavy": sorted({m.split(".")[0] for m in set(sys.modules) - before} & set(heavy)),
}))
"""


def measure_pack_load() -> dict:
    """Import the pack as ComfyUI's loader does, call its entry point and build every schema."""
    pack_dir = ensure_pack_link()
    done = subprocess.run([str(VENV_PY), "-c", PROBE, str(COMFY), str(pack_dir), ",".join(HEAVY)],
                          capture_output=True, text=True, cwd=COMFY, timeout=600)
    assert done.returncode == 0, f"loading the pack failed:\n{done.stderr[-6000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_loading_the_pack_imports_no_face_library(artifacts):
    result = measure_pack_load()
    report = (f"pack import {result['import_s']:.3f} s; import + comfy_entrypoint + {result['nodes']} schemas "
              f"{result['load_s']:.3f} s; {result['new_modules']} modules beyond the host's")
    (artifacts / "import_time.txt").write_text(report + "\n")
    assert result["heavy"] == [], f"{report}; imported: {result['heavy']}"
    assert result["load_s"] < LOAD_BUDGET_S, f"{report}: over the {LOAD_BUDGET_S} s budget"
