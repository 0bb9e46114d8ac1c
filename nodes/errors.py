"""Errors a node passes on from the code it calls, named after the node and the input they came from."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def from_input(node: str, name: str):
    """A ValueError or FileNotFoundError raised inside becomes "<node>: '<name>' <message>" (same type)."""
    try:
        yield
    except (ValueError, FileNotFoundError) as error:
        if str(error).startswith(f"{node}:"):
            raise
        raise type(error)(f"{node}: '{name}' {error}") from error
