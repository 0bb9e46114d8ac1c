"""On a ComfyUI below the pack's floor (0.3.60) the pack says so in one log line and registers
no node, instead of failing at the first sampling step. The old host is ComfyUI 0.3.52 from the
registry, provisioned by ``tools/host.py test`` beside the 0.3.75 host, whose venv runs it; its
server does not start with that venv's newer frontend packages, so its own start-up code is run
up to and including loading the custom nodes (``nodes.init_extra_nodes``), as main.py does."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from idf_testlib.paths import CUSTOM_NODES, in_ci

#: argv: the old ComfyUI folder, the custom_nodes folder holding the pack's link.
STARTUP = r"""
import asyncio, json, logging, sys
comfy_dir, custom_nodes = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
import comfy.options
comfy.options.enable_args_parsing(False)
from comfy.cli_args import args
args.cpu = True
import utils.extra_config, folder_paths, execution, server, nodes   # main.py's imports, in its order
folder_paths.add_model_folder_path("custom_nodes", custom_nodes)
asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
print(json.dumps(sorted(nodes.NODE_CLASS_MAPPINGS)))
"""


@pytest.fixture(scope="module")
def old_comfy() -> Path:
    comfy = os.environ.get("IDFUSION_FLOOR_CHECK_COMFY")
    if not comfy or not (Path(comfy) / "main.py").is_file():
        reason = "no ComfyUI below the floor provisioned (tools/host.py test does it beside the 0.3.75 host)"
        if in_ci() and os.environ.get("IDFUSION_HOST_NAME", "0.3.75") == "0.3.75":
            pytest.fail(reason)
        pytest.skip(reason)
    return Path(comfy)


def test_an_older_host_gets_one_clear_line_and_no_node(old_comfy, server, artifacts):
    # ``server`` made the checkout's custom_nodes link the pack loads through
    done = subprocess.run([sys.executable, "-c", STARTUP, str(old_comfy), str(CUSTOM_NODES)], cwd=old_comfy,
                          capture_output=True, text=True, timeout=300)
    (artifacts / "floor-check.log").write_text(done.stderr)
    assert done.returncode == 0, done.stderr[-4000:]
    registered = json.loads(done.stdout.strip().splitlines()[-1])
    assert "KSampler" in registered
    # the test servers' own test-only nodes (tests/idf_testlib/server_nodes) load from the same folder
    assert not [name for name in registered if name.startswith("IDFusion") and not name.startswith("IDFusionTest")]
    lines = [line for line in done.stderr.splitlines() if "IDFusion" in line and "0.3.60" in line]
    assert lines == ["IDFusion needs ComfyUI 0.3.60 or newer, found ComfyUI 0.3.52: update ComfyUI and restart it "
                     "(IDFusion registers no nodes)."], done.stderr[-4000:]
    summary = [line for line in done.stderr.splitlines() if line.rstrip().endswith("custom_nodes/IDFusion")]
    assert summary and "IMPORT FAILED" not in summary[0]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
