"""loaders nodes."""
NODES = []
