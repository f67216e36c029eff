"""The dashboard's input handling: redirects only to its own paths (review L2), numbers
within what the database holds (L12)."""

from __future__ import annotations

import pytest

from app.dashboard import views
from app.dashboard.auth import safe_next


@pytest.mark.parametrize(
    "target", ["/", "/users", "/users?before=5&q=al", "/sessions/12", "/db#switchover"]
)
def test_local_paths_are_kept(target: str) -> None:
    assert safe_next(target) == target


@pytest.mark.parametrize(
    "target",
    [
        None,
        "",
        "https://evil.example/",
        "//evil.example/",
        "/\\evil.example/",
        "/\t/evil.example/",  # /%09/evil.example: browsers drop the tab
        "/\n/evil.example/",
        "/\r//evil.example/",
        "/ /evil.example/",
        "/\x7f/evil.example/",
        "evil.example",
    ],
)
def test_anything_that_could_leave_the_site_goes_home(target: str | None) -> None:
    assert safe_next(target) == "/"


@pytest.mark.parametrize(
    ("value", "number"),
    [
        (None, None),
        ("", None),
        ("12", 12),
        ("x", None),
        ("-1", None),
        (str(2**63), None),
        ("9" * 30, None),
        (str(2**63 - 1), 2**63 - 1),
    ],
)
def test_numbers_in_queries_and_paths_stay_within_a_bigint(
    value: str | None, number: int | None
) -> None:
    assert views._int(value) == number
