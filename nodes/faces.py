"""faces nodes."""
NODES = []
