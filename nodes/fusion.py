"""fusion nodes."""
NODES = []
