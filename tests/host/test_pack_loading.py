"""The pack loaded in process by ComfyUI's own ``nodes.load_custom_node``, and every node's
V3 schema validated the way the host validates it."""
import asyncio
import logging
import sys

import pytest

from idf_testlib.paths import PACK, PACK_LINK, ensure_pack_link

ensure_pack_link()
#: The name ``nodes.load_custom_node`` gives a package folder in ``sys.modules``.
LOADED_NAME = str(PACK_LINK).replace(".", "_x_")


@pytest.fixture
def comfy_nodes(host):
    """ComfyUI's ``nodes`` module; its registries and ``sys.modules`` lose the loaded pack afterwards."""
    import nodes
    registries = (nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS, nodes.LOADED_MODULE_DIRS)
    saved = [dict(registry) for registry in registries]
    yield nodes
    for registry, before in zip(registries, saved):
        registry.clear()
        registry.update(before)
    for name in [name for name in sys.modules if name == LOADED_NAME or name.startswith(LOADED_NAME + ".")]:
        del sys.modules[name]


def test_comfyui_loader_registers_every_node(comfy_nodes, caplog):
    from comfy_api.latest import ComfyExtension
    core = set(comfy_nodes.NODE_CLASS_MAPPINGS)
    with caplog.at_level(logging.WARNING):
        loaded = asyncio.run(comfy_nodes.load_custom_node(str(PACK_LINK), core, module_parent="custom_nodes"))
    assert loaded, f"ComfyUI could not load the pack:\n{caplog.text}"
    extension = asyncio.run(sys.modules[LOADED_NAME].comfy_entrypoint())
    assert isinstance(extension, ComfyExtension)
    declared = {node.GET_SCHEMA().node_id for node in asyncio.run(extension.get_node_list())}
    assert declared, "the pack registered no nodes"
    registered = {node_id for node_id, cls in comfy_nodes.NODE_CLASS_MAPPINGS.items()
                  if getattr(cls, "RELATIVE_PYTHON_MODULE", None) == f"custom_nodes.{PACK}"}
    assert registered == declared, f"node ids taken by core nodes: {sorted(declared & core)}"


def schema_problems(node) -> list[str]:
    """Why the host would reject a node class, or what its schema leaves undocumented."""
    try:
        schema = node.GET_SCHEMA()
    except Exception as error:  # the host's own validation: report every node, not the first
        return [f"{node.__name__}: {type(error).__name__}: {error}"]
    problems = [f"input {item.id!r} has no tooltip" for item in schema.inputs if not (item.tooltip or "").strip()]
    if not schema.category.startswith(f"{PACK}/"):
        problems.append(f"category {schema.category!r} is not under '{PACK}/'")
    if not (schema.display_name or "").startswith(PACK):
        problems.append(f"display name {schema.display_name!r} does not start with '{PACK}'")
    if not (schema.description or "").strip():
        problems.append("no description")
    return [f"{schema.node_id}: {problem}" for problem in problems]


def test_every_node_schema_validates_and_is_documented(host):
    from IDFusion.nodes import NODES
    assert NODES, "the pack registered no nodes"
    assert [problem for node in NODES for problem in schema_problems(node)] == []
    node_ids = [node.GET_SCHEMA().node_id for node in NODES]
    assert len(set(node_ids)) == len(node_ids), f"node ids used twice: {sorted(node_ids)}"
