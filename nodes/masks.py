"""masks nodes."""
NODES = []
