"""JSON from outside (params, webhook bodies, upstream answers) within a depth bound.

Python's JSON decoder and encoder recurse: a value nested some thousand levels raises
``RecursionError`` wherever it is read or written again. Such values are told apart here, in
one place, without recursion."""

from __future__ import annotations

import json
from typing import Any

#: No answer an agent acts on nests deeper than this.
ANSWER_DEPTH_MAX = 128


class TooDeep(ValueError):
    """JSON text nested deeper than the bound."""


def too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists and mappings more than ``limit`` deep."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list | tuple):
            if depth > limit:
                return True
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list | tuple))
    return False


def loads(text: str | bytes, limit: int = ANSWER_DEPTH_MAX) -> Any:
    """``json.loads``, raising :class:`TooDeep` for text nested deeper than ``limit``."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise TooDeep(f"nested deeper than {limit} levels") from None
    if too_deep(value, limit):
        raise TooDeep(f"nested deeper than {limit} levels")
    return value
