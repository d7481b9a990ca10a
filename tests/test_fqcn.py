"""Tests of objdl.fqcn: each naming rule, and the path helpers."""

from __future__ import annotations

import pytest

from objdl import fqcn


def seg(n: int, ch: str = "a") -> str:
    return ch * n


def long_valid_name(length: int) -> str:
    """A valid name of exactly `length` characters, made of distinct segments."""
    segments: list[str] = []
    total = -1  # no separator before the first segment
    i = 0
    while total + 1 + fqcn.MAX_SEGMENT_LENGTH <= length:
        segment = f"{i:04d}" + seg(fqcn.MAX_SEGMENT_LENGTH - 4)
        segments.append(segment)
        total += 1 + len(segment)
        i += 1
    rest = length - total - 1
    if rest > 0:
        segments.append(seg(rest, "z"))
    name = fqcn.SEPARATOR.join(segments)
    assert len(name) == length
    return name


@pytest.mark.parametrize(
    "name",
    [
        "server",
        "site-1",
        "site-1.job-7",
        "a.b.c.d",
        "A_b~C-9",
        "0",
        seg(fqcn.MAX_SEGMENT_LENGTH),
        long_valid_name(fqcn.MAX_FQCN_LENGTH),
    ],
)
def test_valid_names(name: str) -> None:
    assert fqcn.is_valid(name)
    assert fqcn.validate(name) is name


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        (None, "must be a str, not NoneType"),
        (b"site-1", "must be a str, not bytes"),
        (1, "must be a str, not int"),
        ("", "must not be empty"),
        (long_valid_name(fqcn.MAX_FQCN_LENGTH + 1), "the limit is 255"),
        (".site", "empty segment"),
        ("site.", "empty segment"),
        ("site..job", "empty segment"),
        (".", "empty segment"),
        (seg(fqcn.MAX_SEGMENT_LENGTH + 1), "longer than 64 characters"),
        ("ok." + seg(fqcn.MAX_SEGMENT_LENGTH + 1, "b"), "longer than 64 characters"),
        ("site 1", "character other than"),
        ("site/1", "character other than"),
        ("sité", "character other than"),
        ("site\n", "character other than"),
        ("site-\u0661", "character other than"),  # a non-ASCII digit
        ("a.b.a", "repeats segment 'a'"),
        ("x.x", "repeats segment 'x'"),
    ],
)
def test_invalid_names_say_which_rule(name: object, rule: str) -> None:
    assert not fqcn.is_valid(name)
    with pytest.raises(ValueError, match="invalid cell name") as info:
        fqcn.validate(name)
    assert rule in str(info.value)


def test_split() -> None:
    assert fqcn.split("site-1.job-7.x") == ["site-1", "job-7", "x"]
    assert fqcn.split("server") == ["server"]
    with pytest.raises(ValueError):
        fqcn.split("bad..name")


def test_join() -> None:
    assert fqcn.join("site-1", "job-7") == "site-1.job-7"
    assert fqcn.join("site-1.job-7", "x") == "site-1.job-7.x"
    assert fqcn.join("server") == "server"
    for bad in [("site-1", ""), ("a", "a"), ("a b",), ()]:
        with pytest.raises(ValueError):
            fqcn.join(*bad)


def test_root() -> None:
    assert fqcn.root("site-1.job-7.x") == "site-1"
    assert fqcn.root("server") == "server"
    with pytest.raises(ValueError):
        fqcn.root("")


def test_parent() -> None:
    assert fqcn.parent("site-1.job-7.x") == "site-1.job-7"
    assert fqcn.parent("site-1.job-7") == "site-1"
    assert fqcn.parent("server") is None
    with pytest.raises(ValueError):
        fqcn.parent("site-1.")


@pytest.mark.parametrize(
    ("ancestor", "name", "expected"),
    [
        ("site-1", "site-1.job-7", True),
        ("site-1", "site-1.job-7.x", True),
        ("site-1.job-7", "site-1.job-7.x", True),
        ("site-1", "site-1", False),
        ("site-1.job-7", "site-1", False),
        ("site-1", "site-10.job", False),
        ("site-1", "site-2.job-7", False),
        ("job-7", "site-1.job-7", False),
    ],
)
def test_is_ancestor(ancestor: str, name: str, expected: bool) -> None:
    assert fqcn.is_ancestor(ancestor, name) is expected


def test_is_ancestor_validates_both_names() -> None:
    with pytest.raises(ValueError):
        fqcn.is_ancestor("", "site-1")
    with pytest.raises(ValueError):
        fqcn.is_ancestor("site-1", "site-1..x")
