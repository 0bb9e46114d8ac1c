"""landmarks nodes."""
NODES = []
