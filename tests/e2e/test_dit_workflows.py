"""The DiT example workflows through the real server (ComfyUI 0.17.0+): small random Flux.1-dev and
Flux.2 Klein with full-size random VAEs, face crops from the synthetic photos, CLIP-L in place of
the text encoders this machine cannot build (``dit_fixtures``). Each runs end to end, its IDFusion
node changes the picture (against the same graph at strength 0), and the training-free references
are computed once per run and served from the cache on the next queue run."""
import numpy as np
import pytest
from PIL import Image

from idf_testlib import workflows
from idf_testlib.paths import comfy_version
from idf_testlib.server import execution_error

pytestmark = pytest.mark.skipif(not workflows.runs_on("flux2_klein_two_people.json", comfy_version()),
                                reason=f"the DiT workflows need {workflows.needs_text('flux2_klein_two_people.json')};"
                                       f" this host is {'.'.join(map(str, comfy_version()))}")


def with_inputs(prompt: dict, class_type: str, **values) -> dict:
    for node in prompt.values():
        if node["class_type"] == class_type:
            node["inputs"].update(values)
    return prompt


def run(server, prompt: dict, artifacts, label: str) -> np.ndarray:
    entry = server.run(prompt, timeout=900)
    assert execution_error(entry) is None, f"{label}: {execution_error(entry)}\n{server.log_tail(3000)}"
    (path,) = [p for p in server.output_images(entry) if "IDFusion" in str(p)]
    with Image.open(path) as image:
        assert image.size == (workflows.TEST_IMAGE_SIZE, workflows.TEST_IMAGE_SIZE)
        image.save(artifacts / f"output-{label}.png")
        return np.asarray(image)


def test_flux2_klein_two_people(server, dit_prepared, artifacts):
    info = server.object_info()
    prompt = dit_prepared(workflows.load("flux2_klein_two_people.json"), info)
    people = [n for n in prompt.values() if n["class_type"] == "IDFusionDiTIdentityReferences"]
    assert len(people) == 1 and "identity_masks" in people[0]["inputs"] and "identity_2" in people[0]["inputs"]
    routed = run(server, prompt, artifacts, "flux2_klein_two_people")
    without = run(server, with_inputs(dit_prepared(workflows.load("flux2_klein_two_people.json"), info),
                                      "IDFusionDiTIdentityReferences", strength_1=0.0, strength_2=0.0),
                  artifacts, "flux2_klein_two_people-strength0")
    assert not np.array_equal(routed, without)


def test_flux1_dev_training_free(server, dit_prepared, artifacts):
    info = server.object_info()
    workflow = workflows.load("flux1_dev_training_free.json")
    before = server.get("/idfusion/stats")
    patched = run(server, dit_prepared(workflow, info), artifacts, "flux1_dev_training_free")
    middle = server.get("/idfusion/stats")
    assert middle["reference_passes"] - before["reference_passes"] == 1, "timestep zero: one pass for the run"
    again = run(server, with_inputs(dit_prepared(workflow, info), "KSampler", seed=43), artifacts,
                "flux1_dev_training_free-seed43")
    after = server.get("/idfusion/stats")
    assert after["reference_passes"] == middle["reference_passes"] and after["hits"] > middle["hits"]
    assert not np.array_equal(again, patched)
    off = run(server, with_inputs(dit_prepared(workflow, info), "IDFusionDiTReferenceAttention", strength=0.0),
              artifacts, "flux1_dev_training_free-strength0")
    assert not np.array_equal(off, patched)
