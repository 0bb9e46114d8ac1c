"""IDFusion Identity: the crops (and embeddings) of one person's photos become one identity."""
import numpy as np
import pytest
import torch

from idf_testlib import face_fixtures as ff


@pytest.fixture(scope="module")
def analyzer(host):
    ff.insightface_pack("antelopev2")
    from IDFusion.models.faces.analysis import load_analyzer
    return load_analyzer("antelopev2", "CPU", 320)


def detect(analyzer, *arrays, **options):
    from IDFusion.nodes.faces import FaceDetect
    settings = dict(selection="largest", index=0, min_score=0.5, no_face="error", crop_size=224, margin=0.0)
    settings.update(options)
    return FaceDetect.execute(analyzer, ff.to_image(*arrays), **settings).result


def identity_node(**inputs):
    from IDFusion.nodes.identity import IdentityNode
    settings = dict(label="ada", size=224)
    settings.update(inputs)
    return IdentityNode.execute(**settings).result


def photo(cx, cy, roll=0.0, green=0, seed=0):
    return ff.scene(320, 320, [ff.MarkerFace(cx, cy, 75, 100, roll=roll, green=green)], seed=seed)


def test_several_photos_of_one_person_make_one_identity(analyzer):
    from IDFusion.models.faces.identity import Identity
    faces, crops, aligned, _, _ = detect(analyzer, photo(120, 150), photo(200, 170, roll=15, seed=1),
                                         photo(160, 140, roll=-10, seed=2))
    identity, shown = identity_node(faces=faces)
    assert isinstance(identity, Identity) and identity.label == "ada" and identity.count == 3
    assert torch.equal(identity.crops, crops) and torch.equal(shown, identity.crops)
    assert tuple(identity.embeddings.shape) == (3, 512)
    torch.testing.assert_close(identity.embeddings.norm(dim=1), torch.ones(3))
    assert torch.equal(identity.aligned, aligned)
    mean = identity.mean_embedding()
    assert all(float(mean @ e) > 0.9 for e in identity.embeddings)


def test_crops_alone_are_padded_to_a_square_of_the_chosen_size(host):
    crops = torch.ones(2, 60, 90, 3)
    identity, shown = identity_node(crops=crops, size=128)
    assert tuple(identity.crops.shape) == (2, 128, 128, 3) and identity.embeddings is None
    assert identity.crops[:, 64, 64].min() > 0.99 and identity.crops[:, 5].max() == 0  # black bars above and below


@pytest.mark.parametrize("channels", [1, 4])
def test_grayscale_and_rgba_crops_become_rgb(host, channels):
    identity, _ = identity_node(crops=torch.rand(1, 64, 64, channels))
    assert tuple(identity.crops.shape) == (1, 224, 224, 3)


def test_photos_of_different_sizes_detected_one_by_one_batch_into_one_identity(analyzer):
    """The documented path: each photo through Face Detect (crops share crop_size), then one batch."""
    small = ff.scene(240, 300, [ff.MarkerFace(150, 120, 60, 80)])
    large = ff.scene(480, 400, [ff.MarkerFace(220, 260, 120, 160)], seed=4)
    crops = torch.cat([detect(analyzer, small)[1], detect(analyzer, large)[1]])
    identity, _ = identity_node(crops=crops)
    assert identity.count == 2 and tuple(identity.crops.shape) == (2, 224, 224, 3)


def test_crops_and_faces_must_match_in_count(analyzer):
    faces = detect(analyzer, photo(120, 150), photo(200, 170, seed=1))[0]
    with pytest.raises(ValueError, match="IDFusionIdentity: 3 crops but 2 faces; connect the crops and faces of"):
        identity_node(faces=faces, crops=torch.rand(3, 224, 224, 3))


def test_user_crops_with_their_faces_keep_the_embeddings(analyzer):
    faces, crops, _, _, _ = detect(analyzer, photo(120, 150), photo(200, 170, seed=1))
    identity, _ = identity_node(faces=faces, crops=1.0 - crops)
    assert torch.equal(identity.crops, 1.0 - crops)
    assert torch.equal(identity.embeddings, faces.embeddings())


def test_nothing_connected_says_what_to_connect(host):
    with pytest.raises(ValueError, match="connect 'faces' .* or 'crops'"):
        identity_node()


def test_faces_without_any_face_are_refused(analyzer):
    faces = detect(analyzer, ff.canvas(256, 256), no_face="skip")[0]
    with pytest.raises(ValueError, match="no face to build the identity from"):
        identity_node(faces=faces)


def test_embeddings_follow_the_person(analyzer):
    """Two photos of one (synthetic) person are closer to each other than to another person."""
    faces = detect(analyzer, photo(120, 150), photo(180, 160, seed=3), photo(150, 150, green=60))[0]
    e = faces.embeddings().numpy()
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])
    assert np.isfinite(e).all()
