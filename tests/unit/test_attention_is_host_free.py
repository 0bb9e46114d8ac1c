"""``IDFusion.attention`` is plain torch: every module under attention/ imports in a fresh,
isolated interpreter where ComfyUI cannot be found, and loads no host module."""
import json
import subprocess
import sys

from idf_testlib.paths import PACK, ROOT

ATTENTION = ROOT / "attention"
#: Top-level modules of the ComfyUI host.
HOST_MODULES = ("comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "nodes", "server",
                "execution", "node_helpers", "latent_preview")

#: argv: the checkout, the pack's name, comma-separated host modules, then the modules to import.
PROBE = r"""
import importlib, importlib.machinery, importlib.util, json, sys
root, pack, host = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
assert importlib.util.find_spec("comfy") is None, "ComfyUI is importable here: the check would prove nothing"
package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(pack, None, is_package=True))
package.__path__ = [root]  # the pack's folder, without running its ComfyUI entry point
sys.modules[pack] = package
for name in sys.argv[4:]:
    importlib.import_module(name)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(host))))
"""


def attention_modules() -> list[str]:
    """Every module under attention/, found on disk (so a new file is checked without listing it)."""
    names = []
    for path in sorted(ATTENTION.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join((PACK,) + (parts[:-1] if parts[-1] == "__init__" else parts)))
    return names


def test_attention_imports_without_the_host(tmp_path):
    modules = attention_modules()
    assert f"{PACK}.attention" in modules
    done = subprocess.run([sys.executable, "-I", "-c", PROBE, str(ROOT), PACK, ",".join(HOST_MODULES), *modules],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, f"importing {modules} without ComfyUI failed:\n{done.stderr[-6000:]}"
    assert json.loads(done.stdout) == [], f"{modules} loaded host modules"
