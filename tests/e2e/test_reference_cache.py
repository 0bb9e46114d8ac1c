"""The feature cache across queue runs through the real server: a second prompt with the same
references, schedule and reference context (a new seed, so the sampler runs again) performs no
reference pass; a new reference context (FlashFace: the negative prompt) recomputes; the disk
cache is kept where ComfyUI's web API does not serve it."""
import requests

from idf_testlib import prompts, workflows
from idf_testlib.flashface_fixtures import write_tiny_checkpoint_for_sd15_clip
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


def test_the_disk_cache_is_kept_where_the_web_api_does_not_serve_it(server, prepared):
    """user/__idfusion/feature_cache: a system-user folder (name starting with "__"), safetensors only;
    nothing in the users' own folders, and the userdata API refuses to reach it."""
    flashface = write_tiny_checkpoint_for_sd15_clip().name
    photo = "idfusion_person_b_2.png"                  # as the crop: references no other test uses, so no cache hit
    entry = server.run(prompts.reference_prompt("idf_disk_cache", flashface=flashface, photo=photo, disk_cache=True))
    assert execution_error(entry) is None, execution_error(entry)
    user = server.workdir / "user"
    folder = user / "__idfusion" / "feature_cache"
    written = sorted(p.name for p in folder.iterdir())
    assert written and all(name.endswith(".safetensors") for name in written), written
    elsewhere = [p for p in user.rglob("*.safetensors") if folder not in p.parents]
    assert elsewhere == []
    for path, params in (("/userdata", {"dir": "../__idfusion/feature_cache"}),
                         (f"/userdata/..%2F__idfusion%2Ffeature_cache%2F{written[0]}", None)):
        answer = requests.get(server.url + path, params=params, timeout=30)
        assert answer.status_code in (400, 403, 404), (path, answer.status_code)


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
