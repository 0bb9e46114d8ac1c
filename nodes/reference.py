"""reference nodes."""
NODES = []
