"""JSON values of a given shape, for the limits on what events may hold."""

from __future__ import annotations


def nested(depth: int) -> dict[str, object]:
    """An object ``depth`` levels deep: {"a": {"a": ... 1}}."""
    value: object = 1
    for _ in range(depth - 1):
        value = {"a": value}
    return {"a": value}
