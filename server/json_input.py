"""JSON from outside the process, parsed with a bound on its nesting depth.

CPython's `json` recurses once per nesting level and raises RecursionError,
which is not a ValueError, past about a thousand: `[` * 100000 escaped every
`except ValueError` as a 500 or a start-up traceback. Here every parse error,
depth included, is a ValueError, and the depth is bounded far below the
interpreter's limit so the recursive checks that walk the value stay safe too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


class JsonDepthError(ValueError):
    """The document nests deeper than the caller allows."""


def loads(text: str, max_depth: int, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """`json.loads(text)`, or a ValueError (JSONDecodeError, JsonDepthError, or the hook's own)."""
    try:
        value = json.loads(text, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise JsonDepthError(f"nested deeper than {max_depth} levels") from None
    if depth(value) > max_depth:
        raise JsonDepthError(f"nested deeper than {max_depth} levels")
    return value


def depth(value: Any) -> int:
    """Nesting depth without recursion: a scalar is 0, `[]` and `{}` are 1, `[[1]]` is 2."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, level + 1)
        stack.extend((child, level + 1) for child in children)
    return deepest
