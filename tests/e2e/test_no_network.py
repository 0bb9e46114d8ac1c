"""Nothing leaves the machine and nothing is written outside ComfyUI's folders, through the real
server under the socket audit (tests/idf_testlib/netaudit.c: every name lookup and connection of
the server process, native ones included, logged and refused when not loopback) with a home and a
temporary folder of its own: at start-up, while idle, and during a face + reference prompt.
(Every example workflow is checked the same way in test_workflows.py.)

onnxruntime, the runtime insightface needs, starts its telemetry when first imported: about nine
seconds later it looks up mobile.events.data.microsoft.com, and it writes a device id under
~/.cache/Microsoft. The pack switches that off (ORT_DISABLE_TELEMETRY before the first import); a
control server with the switch forced on shows that the audit sees exactly that.
"""
import shutil
import time

import pytest

from idf_testlib import prompts
from idf_testlib.paths import in_ci
from idf_testlib.prompts import Prompt
from idf_testlib.server import ComfyServer, execution_error

TELEMETRY_HOST = "mobile.events.data.microsoft.com"
#: onnxruntime's telemetry looks its host up about 9 s after the import: wait well past that.
TELEMETRY_DELAY = 20.0


@pytest.fixture(scope="module")
def audited(server):
    if server.audit_problem is not None:
        if in_ci():
            pytest.fail(server.audit_problem)
        pytest.skip(server.audit_problem)
    return server


def face_and_reference_prompt() -> Prompt:
    """Detect the face in a photo, make it an identity, encode it, patch and sample (SD1.5)."""
    p = Prompt()
    analyzer = p.add("IDFusionFaceAnalysisLoader", pack="antelopev2", provider="auto", det_size=320)
    photo = p.add("LoadImage", image=prompts.FACE_PHOTO)
    found = p.add("IDFusionFaceDetect", analyzer=p.out(analyzer), image=p.out(photo), selection="largest", index=0,
                  min_score=0.5, no_face="error", crop_size=64, margin=0.0)
    identity = p.add("IDFusionIdentity", faces=p.out(found), label="a", size=64)
    ckpt = prompts.checkpoint(p)
    loader = p.add("IDFusionReferenceNetLoader", model=p.out(ckpt), weights=prompts.TRAINING_FREE)
    feats = p.add("IDFusionFaceFeatures", reference_net=p.out(loader, 1), vae=p.out(ckpt, 2), clip=p.out(ckpt, 1),
                  identity=p.out(identity), size=64, disk_cache=False,
                  reference_context=prompts.EMPTY_PROMPT_CONTEXT, reference_count=0)
    patched = prompts.reference_attention(p, p.out(loader), p.out(feats))
    prompts.sample_and_save(p, p.out(patched), ckpt, "idf_no_network")
    return p


def test_start_up_and_idle_stay_on_the_machine(audited):
    time.sleep(3)
    assert audited.outbound() == []
    assert audited.stray_files() == []


def test_a_face_and_reference_prompt_stays_on_the_machine(audited, prepared):
    start = time.monotonic()
    entry = audited.run(face_and_reference_prompt(), timeout=900)
    assert execution_error(entry) is None, execution_error(entry)
    time.sleep(max(0.0, TELEMETRY_DELAY - (time.monotonic() - start)))      # idle while telemetry would start
    assert audited.outbound() == []
    assert audited.stray_files() == []


def test_the_audit_sees_onnxruntime_telemetry_when_it_is_switched_on(audited, prepared, tmp_path_factory):
    """The control: with ORT_DISABLE_TELEMETRY=0 set for the server, the same face loader makes
    onnxruntime look up its telemetry host (refused by the audit) and write its device id."""
    control = ComfyServer(tmp_path_factory.mktemp("comfy-telemetry"), name="e2e-telemetry-on",
                          env={"ORT_DISABLE_TELEMETRY": "0"})
    shutil.copy(audited.workdir / "input" / prompts.FACE_PHOTO, control.workdir / "input" / prompts.FACE_PHOTO)
    control.start()
    try:
        p = Prompt()
        analyzer = p.add("IDFusionFaceAnalysisLoader", pack="antelopev2", provider="auto", det_size=320)
        photo = p.add("LoadImage", image=prompts.FACE_PHOTO)
        p.add("PreviewImage", images=p.out(p.add("IDFusionFaceDetect", analyzer=p.out(analyzer), image=p.out(photo),
                                                  selection="all", index=0, min_score=0.5, no_face="skip",
                                                  crop_size=64, margin=0.0), 4))
        assert execution_error(control.run(p)) is None
        deadline = time.monotonic() + 3 * TELEMETRY_DELAY
        while time.monotonic() < deadline and not any(TELEMETRY_HOST in line for line in control.outbound()):
            time.sleep(1)
        assert any(TELEMETRY_HOST in line for line in control.outbound()), control.outbound()
        assert any("deviceid" in path for path in control.stray_files()), control.stray_files()
    finally:
        control.stop()
