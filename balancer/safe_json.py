"""JSON from outside, checked before anything uses it: the REST API's parser (orchestration/parsers.py), the MCP
channels and the agents' reading of a model's reply check what they parsed here. In the balancer package as the
state store's atomic_write is (balancer/files.py): the lowest layer that every one of them may import.

Three things that JSON admits break the server later, so they are refused as bad requests at once:

- Depth. Python's JSON decoder recurses once per nesting level, so a body of 100,000 ``[`` raises
  RecursionError (a 500) instead of a parse error; and a packet nested just under the recursion
  limit parses, but breaks whatever walks it recursively later from a deeper stack (the admin's
  indented dump is pure-Python recursion). No payload of a role needs more than a few levels.
- Unpaired surrogates (``"\\ud800"``): valid JSON, but not text, so they cannot be encoded as UTF-8
  when an answer, a state file or a log line quotes them (an unknown field's name, in an error body).
- NUL characters (``"\\u0000"``): PostgreSQL cannot store them in the mirror's JSON column, so one
  such task would stop the mirror from catching up; DRF's own text fields refuse them too.
"""

from __future__ import annotations

from typing import Any

MAX_JSON_DEPTH = 64


class UnsafeJSON(ValueError):
    """JSON that parses but that the server refuses: nested too deep, or text it cannot store. ``field``
    is the top-level key under which the text is, when there is one."""

    def __init__(self, problem: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.problem = problem
        self.field = field


def check_json(value: Any) -> Any:
    """``value`` itself, or ``UnsafeJSON`` if its arrays and objects nest deeper than ``MAX_JSON_DEPTH``
    or one of its strings (a key or a value) holds an unpaired surrogate or a NUL."""
    stack: list[tuple[Any, int, str | None]] = [(value, 1, None)]
    while stack:
        node, depth, field = stack.pop()
        if isinstance(node, str):
            _check_text(node, field)
            continue
        if not isinstance(node, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise UnsafeJSON(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(node, list):
            stack.extend((child, depth + 1, field) for child in node)
            continue
        for key, child in node.items():
            # The field is named with its bad text escaped: an error body that quoted it would not encode.
            name = field or key.encode("utf-8", "backslashreplace").decode("utf-8")
            _check_text(key, name)
            stack.append((child, depth + 1, name))
    return value


def _check_text(text: str, field: str | None) -> None:
    if "\x00" in text:
        raise UnsafeJSON("contains a NUL character (\\u0000)", field)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UnsafeJSON("contains text that is not valid Unicode (an unpaired surrogate)", field) from None
