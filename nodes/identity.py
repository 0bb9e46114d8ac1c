"""identity nodes."""
NODES = []
