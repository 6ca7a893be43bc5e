"""Label selectors as Kubernetes writes them: `site=a,line!=2,tier in (edge,lab),!retired`.

Requirements are joined by commas and all must hold:

    key=value, key==value   the label is there with that value
    key!=value              the label is absent or has another value
    key in (v1,v2)          the label is there with one of the values
    key notin (v1,v2)       the label is absent or has none of the values
    key                     the label is there (any value)
    !key                    the label is absent

Anything else is an error naming the part that could not be read, never a selector that
silently matches nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from edge_agent.errors import InvalidInput

_KEY = r"[\w./-]+"  # label keys: letters, digits, -_./ (cloud.domain.validate_labels)
_VALUE = r"[^,=()\n]*"
_SET = re.compile(rf"^\s*({_KEY})\s+(in|notin)\s*\(([^()]*)\)\s*$")
_EQUAL = re.compile(rf"^\s*({_KEY})\s*(==|=|!=)\s*({_VALUE})\s*$")
_EXISTS = re.compile(rf"^\s*(!?)\s*({_KEY})\s*$")


@dataclass(frozen=True)
class Requirement:
    """One clause of a selector."""

    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def holds(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op in ("=", "in"):
            return value is not None and value in self.values
        if self.op in ("!=", "notin"):
            return value is None or value not in self.values
        if self.op == "exists":
            return value is not None
        return value is None


@dataclass(frozen=True)
class Selector:
    """All requirements must hold; no requirement selects everything."""

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def equal(cls, labels: Mapping[str, str]) -> Selector:
        return cls(tuple(Requirement(k, "=", frozenset({v})) for k, v in labels.items()))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.holds(labels) for r in self.requirements)

    def equalities(self) -> dict[str, str]:
        """The key=value requirements (what a device matching this must carry)."""
        return {r.key: next(iter(r.values)) for r in self.requirements if r.op == "="}


def _parts(text: str) -> list[str]:
    """Splits on commas outside parentheses."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise InvalidInput(f"selector '{text}': a ')' without its '('")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise InvalidInput(f"selector '{text}': a '(' is never closed")
    parts.append("".join(current))
    return [p for p in (p.strip() for p in parts) if p]


def parse_selector(text: str) -> Selector:
    """Parses a selector; empty text selects everything."""
    requirements = []
    for part in _parts(text):
        if m := _SET.match(part):
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            if not values:
                raise InvalidInput(f"selector part '{part}': '{m.group(2)}' needs values")
            requirements.append(Requirement(m.group(1), m.group(2), values))
        elif m := _EQUAL.match(part):
            op = "!=" if m.group(2) == "!=" else "="
            requirements.append(Requirement(m.group(1), op, frozenset({m.group(3).strip()})))
        elif m := _EXISTS.match(part):
            requirements.append(Requirement(m.group(2), "!exists" if m.group(1) else "exists"))
        else:
            raise InvalidInput(
                f"selector part '{part}' is not one of key=value, key!=value, "
                "key in (a,b), key notin (a,b), key, !key"
            )
    return Selector(tuple(requirements))


def matches(labels: Mapping[str, str], selector: Selector | Mapping[str, str]) -> bool:
    """Whether `labels` satisfy `selector` (a mapping means key=value for each item)."""
    if not isinstance(selector, Selector):
        selector = Selector.equal(selector)
    return selector.matches(labels)
