"""The feature cache across queue runs through the real server: a second prompt with the same
references and schedule (a new seed, so the sampler runs again) performs no reference pass."""
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
