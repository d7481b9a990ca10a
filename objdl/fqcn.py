"""Fully qualified cell names (FQCNs).

A cell's name is a dot-separated path such as ``server``, ``site-1`` or
``site-1.job-7``: the first segment is the root (a site or the server), each further
segment a cell under its parent. Names arrive from the network, so every public
helper validates what it is given and says which rule a bad name breaks.
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_FQCN_LENGTH",
    "MAX_SEGMENT_LENGTH",
    "SEPARATOR",
    "is_ancestor",
    "is_valid",
    "join",
    "parent",
    "root",
    "split",
    "validate",
]

SEPARATOR = "."
MAX_FQCN_LENGTH = 255
MAX_SEGMENT_LENGTH = 64

_SEGMENT = re.compile(r"[A-Za-z0-9_~-]+")


def _problem(name: object) -> str | None:
    """Return why `name` is not a valid FQCN, or None when it is."""
    if not isinstance(name, str):
        return f"must be a str, not {type(name).__name__}"
    if not name:
        return "must not be empty"
    if len(name) > MAX_FQCN_LENGTH:
        return f"is {len(name)} characters long; the limit is {MAX_FQCN_LENGTH}"
    segments = name.split(SEPARATOR)
    seen: set[str] = set()
    for seg in segments:
        if not seg:
            return "has an empty segment (leading, trailing or doubled '.')"
        if len(seg) > MAX_SEGMENT_LENGTH:
            return f"has segment {seg[:16]!r}... longer than {MAX_SEGMENT_LENGTH} characters"
        if not _SEGMENT.fullmatch(seg):
            return f"has segment {seg!r} with a character other than letters, digits, '_', '-', '~'"
        if seg in seen:
            return f"repeats segment {seg!r}"
        seen.add(seg)
    return None


def is_valid(name: object) -> bool:
    """True when `name` is a valid FQCN."""
    return _problem(name) is None


def validate(name: object) -> str:
    """Return `name` unchanged if it is a valid FQCN.

    Raises:
        ValueError: naming the name and the rule it breaks.
    """
    problem = _problem(name)
    if problem is not None:
        shown = repr(name)
        if len(shown) > 80:  # names come from the network: keep errors and logs short
            shown = shown[:77] + "..."
        raise ValueError(f"invalid cell name {shown}: it {problem}")
    assert isinstance(name, str)
    return name


def split(name: str) -> list[str]:
    """The segments of a valid FQCN, root first."""
    return validate(name).split(SEPARATOR)


def join(*segments: str) -> str:
    """Join segments (or FQCNs) into one FQCN and validate the result."""
    return validate(SEPARATOR.join(segments))


def root(name: str) -> str:
    """The first segment: ``root("site-1.job-7") == "site-1"``."""
    return split(name)[0]


def parent(name: str) -> str | None:
    """The name one level up, or None for a root name."""
    segments = split(name)
    return SEPARATOR.join(segments[:-1]) if len(segments) > 1 else None


def is_ancestor(ancestor: str, name: str) -> bool:
    """True when `ancestor` is a strict ancestor of `name` (``site-1`` of ``site-1.job-7``)."""
    validate(ancestor)
    validate(name)
    return name.startswith(ancestor + SEPARATOR)
