"""Shared test helpers: the real ComfyUI host (in process and as a server) and fixtures
generated at test time (random weights in the real layouts, never committed)."""
