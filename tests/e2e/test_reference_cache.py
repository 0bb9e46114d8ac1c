"""The feature cache across queue runs through the real server: a second prompt with the same
references and schedule (a new seed, so the sampler runs again) performs no reference pass; the
disk cache is kept where ComfyUI's web API does not serve it."""
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
