"""The feature cache across queue runs through the real server: a second prompt with the same
references, schedule and reference context (a new seed, so the sampler runs again) performs no
reference pass; a new reference context (FlashFace: the negative prompt) recomputes."""
from idf_testlib import workflows
from idf_testlib.server import execution_error


def seeded(prompt: dict, seed: int) -> dict:
    for node in prompt.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["seed"] = seed
    return prompt


def test_second_queue_run_performs_no_reference_pass(server, prepared):
    info = server.object_info()
    workflow = workflows.load("training_free_sd15.json")
    before = server.get("/idfusion/stats")
    first = server.run(seeded(workflows.to_api(workflow, info, prepared), 1), timeout=600)
    assert execution_error(first) is None, execution_error(first)
    middle = server.get("/idfusion/stats")
    second = server.run(seeded(workflows.to_api(workflow, info, prepared), 2), timeout=600)
    assert execution_error(second) is None, execution_error(second)
    after = server.get("/idfusion/stats")

    assert middle["reference_passes"] - before["reference_passes"] == 2          # 2 steps, one pass each
    assert after["reference_passes"] == middle["reference_passes"]               # all served from the cache
    assert after["hits"] - middle["hits"] == 2
    assert server.output_images(first) != server.output_images(second)


def passes_of(server, prompt: dict) -> int:
    """Reference passes the prompt's run performed (it must succeed)."""
    before = server.get("/idfusion/stats")["reference_passes"]
    entry = server.run(prompt, timeout=600)
    assert execution_error(entry) is None, execution_error(entry)
    return server.get("/idfusion/stats")["reference_passes"] - before


def linked(prompt: dict, class_type: str, name: str) -> str:
    """The id of the node feeding input ``name`` of the (only) node of ``class_type``."""
    node = next(n for n in prompt.values() if n["class_type"] == class_type)
    return node["inputs"][name][0]


def test_flashface_features_follow_the_negative_prompt(server, prepared):
    """FlashFace's reference pass runs with the negative prompt: a new seed keeps the features
    (no pass); another negative prompt recomputes them (one pass per step)."""
    prompt = workflows.to_api(workflows.load("flashface_four_references.json"), server.object_info(), prepared)
    noise = next(n for n in prompt.values() if n["class_type"] == "RandomNoise")
    negative = prompt[linked(prompt, "IDFusionFaceFeatures", "negative")]
    assert negative["class_type"] == "CLIPTextEncode"
    noise["inputs"]["noise_seed"] = 1
    assert passes_of(server, prompt) == 2
    noise["inputs"]["noise_seed"] = 2
    assert passes_of(server, prompt) == 0
    negative["inputs"]["text"] += ", glasses"
    assert passes_of(server, prompt) == 2


def test_training_free_empty_prompt_context_survives_negative_prompt_edits(server, prepared):
    """The measurement behind the training-free default (docs/flashface_official.md): editing the
    negative prompt costs no reference pass with the empty-prompt context, and one per step
    with the negative-prompt context."""
    prompt = workflows.to_api(workflows.load("training_free_sd15.json"), server.object_info(), prepared)
    sampler = next(n for n in prompt.values() if n["class_type"] == "KSampler")
    negative = prompt[sampler["inputs"]["negative"][0]]
    features = next(n for n in prompt.values() if n["class_type"] == "IDFusionFaceFeatures")
    counts = {}
    for context in ("empty prompt", "negative prompt"):
        features["inputs"]["reference_context"] = context
        features["inputs"]["negative"] = sampler["inputs"]["negative"]
        passes_of(server, prompt)
        negative["inputs"]["text"] += f", edit for {context}"
        counts[context] = passes_of(server, prompt)
    assert counts == {"empty prompt": 0, "negative prompt": 2}
