"""Failpoints: parsing, and that an armed point really SIGKILLs the process at the N-th hit."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from klaviyo_bridge import failpoints


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", {}),
        ("after_fetch=kill", {"after_fetch": 1}),
        ("mid_batch=kill@3, after_outbox_commit=kill", {"mid_batch": 3, "after_outbox_commit": 1}),
    ],
)
def test_parse(spec: str, expected: dict[str, int]) -> None:
    """Result: each armed point with the number of hits before the kill."""
    assert failpoints.parse(spec) == expected


@pytest.mark.parametrize("spec", ["nope=kill", "after_fetch=panic", "after_fetch=kill@x", "after_fetch=kill@0"])
def test_parse_rejects_typos(spec: str) -> None:
    """Result: a typo is an error, never a silently unarmed point."""
    with pytest.raises(ValueError, match="bad failpoint"):
        failpoints.parse(spec)


def test_unarmed_point_does_nothing() -> None:
    """Result: with nothing armed, hit() returns."""
    failpoints.arm({})
    failpoints.hit("after_fetch")


def test_armed_point_kills_at_the_nth_hit() -> None:
    """1. A child arms mid_batch=kill@3 and hits it, printing before each hit.
    Result: it dies by SIGKILL after printing 3 lines."""
    code = (
        "from klaviyo_bridge import failpoints\n"
        "for i in range(5):\n"
        "    print(i, flush=True)\n"
        "    failpoints.hit('mid_batch')\n"
    )
    env = {failpoints.ENV: "mid_batch=kill@3"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout.split() == ["0", "1", "2"]
