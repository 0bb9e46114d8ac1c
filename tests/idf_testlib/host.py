"""The real ComfyUI host, imported in process (CPU), and the pack imported as a package.

``boot()`` is idempotent. It makes ``import comfy...`` work, forces the CPU, and registers
the pack under ``IDFusion`` without running its top-level ``__init__`` (which needs the
server); ``import IDFusion.nodes`` then imports the real node modules.
"""
import importlib.machinery
import importlib.util
import logging
import sys
import tempfile

from .paths import CACHE, COMFY, PACK, ROOT

_booted = False
#: ComfyUI's input folder in process: a temporary one (removed at exit), never the host's own.
_INPUT = tempfile.TemporaryDirectory(prefix="idfusion-host-input-")


def register_pack() -> None:
    """Make ``IDFusion.<subpackage>`` importable without executing the pack's ``__init__``."""
    if PACK in sys.modules:
        return
    spec = importlib.machinery.ModuleSpec(PACK, None, is_package=True)
    module = importlib.util.module_from_spec(spec)
    module.__path__ = [str(ROOT)]
    sys.modules[PACK] = module


def boot() -> None:
    global _booted
    if _booted:
        return
    if not (COMFY / "comfyui_version.py").is_file():
        raise RuntimeError(f"no ComfyUI host at {COMFY}: run `python3 tools/host.py setup` first")
    if str(COMFY) not in sys.path:
        sys.path.insert(0, str(COMFY))
    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args
    args.cpu = True
    args.disable_api_nodes = True
    import folder_paths
    models = CACHE / "models"
    for folder in ("checkpoints", "vae", "flashface", "insightface", "facexlib", "idfusion", "controlnet",
                   "consistentid", "clip_vision"):
        (models / folder).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(folder, str(models / folder), is_default=True)
    folder_paths.set_temp_directory(tempfile.mkdtemp(prefix="idfusion-host-temp-"))   # previews of host tests
    folder_paths.set_input_directory(_INPUT.name)   # where the pack's entry point copies its sample photos
    import comfy.model_management  # noqa: F401  (reads args.cpu at import)
    register_pack()
    logging.getLogger("IDFusion").setLevel(logging.DEBUG)
    _booted = True
