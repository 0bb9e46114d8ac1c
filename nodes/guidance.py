"""guidance nodes."""
NODES = []
