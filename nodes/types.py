"""Socket types that flow between IDFusion nodes (the values are classes in ``models/``)."""
from .api import io

#: models.reference_net.ReferenceNet: which UNet encodes the references, with whose weights.
ReferenceNet = io.Custom("IDFUSION_REFERENCE_NET")
#: models.faces.FaceAnalyzer: a loaded insightface FaceAnalysis with its provider.
FaceAnalyzer = io.Custom("IDFUSION_FACE_ANALYZER")
#: models.faces.FaceParser: a loaded facexlib BiSeNet.
FaceParser = io.Custom("IDFUSION_FACE_PARSER")
#: models.faces.Faces: detections for an IMAGE batch (boxes, landmarks, embeddings, crops).
Faces = io.Custom("IDFUSION_FACES")
#: models.identity.Identity: reference crops and embeddings of one person.
Identity = io.Custom("IDFUSION_IDENTITY")
#: models.feature_cache.ReferenceFeatures: one or more identities ready for sampling.
ReferenceFeatures = io.Custom("IDFUSION_REFERENCE_FEATURES")
#: models.masks.IdentityMasks: one region per identity, resized per layer on demand.
IdentityMasks = io.Custom("IDFUSION_IDENTITY_MASKS")
#: models.landmarks.Landmarks: 2D points per image with their drawing style.
Landmarks = io.Custom("IDFUSION_LANDMARKS")
#: models.consistentid.weights.ConsistentIDWeights: a loaded ConsistentID file.
ConsistentID = io.Custom("IDFUSION_CONSISTENTID")
#: models.consistentid.face.ConsistentIDFaces: one or more people encoded for ConsistentID, with weights.
ConsistentIDFaces = io.Custom("IDFUSION_CONSISTENTID_FACES")
