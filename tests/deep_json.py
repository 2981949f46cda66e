"""JSON with values nested deeper than json.dumps can write (it recurses): for tests of readers
that must refuse deep nesting without recursing themselves."""

import json
from typing import Any


class Deep:
    """A value that dumps() writes as `depth` nested lists."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def __repr__(self) -> str:
        return f"Deep({self.depth})"


def dumps(obj: Any) -> str:
    """json.dumps, with each Deep written as its nested lists."""
    deep: dict[str, int] = {}

    def placeholder(o: Any) -> str:
        if not isinstance(o, Deep):
            raise TypeError(type(o))
        key = f"@deep{len(deep)}@"
        deep[key] = o.depth
        return key

    text = json.dumps(obj, default=placeholder)
    for key, depth in deep.items():
        text = text.replace(json.dumps(key), "[" * depth + "]" * depth)
    return text
