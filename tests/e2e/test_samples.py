"""The sample photos the example workflows open with reach LoadImage by themselves: a server
started with the pack copies them into its input folder, where LoadImage lists them, and keeps
a file of the same name that is already there, whatever it holds."""
from idf_testlib.paths import ROOT
from idf_testlib.server import ComfyServer

SAMPLES = sorted((ROOT / "samples").iterdir())
USERS_FILE = "idfusion_astronaut.png"


def test_a_starting_server_gets_the_samples_and_keeps_the_users_file(tmp_path):
    users = tmp_path / "input" / USERS_FILE
    users.parent.mkdir(parents=True)
    users.write_bytes(b"the user's own file, not the sample")
    server = ComfyServer(tmp_path, name="samples").start()
    try:
        listed = server.get("/object_info/LoadImage")["LoadImage"]["input"]["required"]["image"][0]
        log = server.log_text()
    finally:
        server.stop()
    assert users.read_bytes() == b"the user's own file, not the sample"
    for sample in SAMPLES:
        assert sample.name in listed, f"LoadImage does not list {sample.name}"
        if sample.name != USERS_FILE:
            assert (users.parent / sample.name).read_bytes() == sample.read_bytes()
    copied = [line for line in log.splitlines() if "sample photos" in line]
    assert len(copied) == 1 and USERS_FILE not in copied[0], copied
