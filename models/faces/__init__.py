"""Faces: insightface analysis and crops, facexlib parsing, identities, the landmark predictor."""
