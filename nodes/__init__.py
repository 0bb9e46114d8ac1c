"""Thin V3 nodes, one module per domain. ``NODES`` lists every node the pack registers."""
from . import consistentid, dit, faces, fusion, guidance, identity, landmarks, loaders, masks, reference

NODES = [
    *loaders.NODES,
    *faces.NODES,
    *identity.NODES,
    *reference.NODES,
    *guidance.NODES,
    *fusion.NODES,
    *masks.NODES,
    *landmarks.NODES,
    *consistentid.NODES,
    *dit.NODES,
]
