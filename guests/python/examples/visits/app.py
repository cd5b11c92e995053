"""Counts visits per name in shared state, with a helper module."""

import json

import shoal
from greeting import greet


def handle(input: bytes) -> bytes:
    name = input.decode().strip() or "world"
    count = shoal.state.incr(f"visits/{name}")
    return json.dumps({"greeting": greet(name), "visits": count}).encode()
