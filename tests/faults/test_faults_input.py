"""Hostile and odd input. The parser and mapping properties live with their modules (tests/test_orders.py:
``parse_order`` returns an Order or raises MalformedOrder for arbitrary JSON; tests/test_core.py: the mapping
never repeats a unique_id nor maps an unmapped status). Here: the command line facing arbitrary TOML, and
odd-but-real orders end to end against the simulators.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit.bridgekit import toml_str
from kit.faultkit import REPO, Bridge, Ledger, assert_delivered_once, in_process, serve, shops

from klaviyo_bridge import cli
from klaviyo_bridge.core import MAX_NAME_CHARS
from klaviyo_bridge.status import status_rows

EXAMPLE = (REPO / "config.example.toml").read_text()
# The example's secrets are credential: references; literals make a loadable base (check-config warns about them).
BASE = re.sub(r'"credential:[^"]*"', '"literal-secret-value"', EXAMPLE)
KEY_LINE = re.compile(r"^(#\s*)?(\w+)\s*=.*$")
TOML_VALUES = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(
        repr(f), repr(f))),
    st.booleans().map(lambda b: str(b).lower()),
    st.text(max_size=30).map(toml_str),
    st.dates().map(lambda d: d.isoformat()),
    st.sampled_from(["[]", "[1, 2]", '["a", 1]', "{}", "{ a = 1 }", "2026-01-01T00:00:00Z", '"env:NOPE"',
                     '"file:/nonexistent"', '"credential:x"', '""', '"   "']),
)


@st.composite
def mutated_configs(draw: st.DrawFn) -> str:
    """Return the example config with random values replaced, lines dropped or junk added."""
    out: list[str] = []
    for line in BASE.splitlines():
        match = KEY_LINE.match(line)
        action = draw(st.sampled_from(["keep"] * 6 + ["replace", "drop", "junk"])) if match else "keep"
        if action == "replace" and match:
            line = f"{match.group(2)} = {draw(TOML_VALUES)}"
        elif action == "drop":
            continue
        elif action == "junk":
            out.append(f"{draw(st.sampled_from(['junk', 'page_size', 'customers', 'x-y']))} = {draw(TOML_VALUES)}")
        out.append(line)
    return "\n".join(out) + draw(st.sampled_from(["", "\n[extra]\na = 1\n", "\n[[customers]]\n", "\n[bridge\n"]))


def cli_outcome(args: list[str]) -> tuple[int, str]:
    """Run the command line in-process and return (exit code, stderr); anything raised fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(args)
    return code, err.getvalue()


def assert_clean(code: int, stderr: str) -> None:
    """A config outcome is exit 0 or 78, and every stderr line is a one-line problem or warning."""
    assert code in (0, 78)
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert all(line.startswith(("config error: ", "config warning: ")) for line in lines), lines
    assert (code == 78) == any(line.startswith("config error: ") for line in lines)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=mutated_configs() | st.text(max_size=300))
def test_any_toml_gives_78_with_messages_never_a_traceback(text: str) -> None:
    """For arbitrary (mostly almost valid) TOML: check-config exits 0 or 78 with one line per problem, and
    when it says 78, ``run`` refuses with 78 too before starting anything."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(text, "utf-8")
        code, stderr = cli_outcome(["check-config", "--config", str(path)])
        assert_clean(code, stderr)
        if code == 78:
            assert cli_outcome(["run", "--once", "--config", str(path)]) == (78, stderr)


def test_run_with_a_broken_config_exits_78_without_a_traceback(tmp_path: Path) -> None:
    """1. A config with a TOML syntax error, another with bad values. 2. ``klaviyo-bridge run`` on each.
    Result: exit 78, problems on stderr, no traceback."""
    broken = tmp_path / "broken.toml"
    broken.write_text("[bridge\nstate_path = 1\n")
    invalid = tmp_path / "invalid.toml"
    invalid.write_text(BASE.replace("page_size = 50", "page_size = -3").replace("poll_interval_seconds = 60.0",
                                                                                "poll_interval_seconds = true"))
    for path in (broken, invalid):
        proc = subprocess.run([sys.executable, "-m", "klaviyo_bridge", "run", "--config", str(path)],
                              capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 78
        assert "config error: " in proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout


# --------------------------------------------------------------------------------------- odd real data

A = shops(901)[0]
LONG_FIRST, LONG_LAST = "Å" * 10_000, "Bø " * 100_000  # a runaway shop plugin: 10k and 300k characters


async def test_odd_but_real_orders_end_to_end(tmp_path: Path) -> None:
    """Unicode and runaway names, names of spaces only, plus-tagged and upper-case emails, an order moving
    backwards, two changes in one second, a cancellation after shipping, a status flapping 100 ↔ 90 —
    through the daemon's worker, every state polled.
    Result: every expected event once, no dead letter, no Klaviyo rejection, sensible profiles."""
    async with serve([A]) as sims:
        w = sims.whiplash
        now = datetime.now(UTC).replace(microsecond=0)

        def make(email: str | None, status: int = 100, ago: timedelta = timedelta(hours=3), **names: object) -> int:
            return int(w.create_order(A.cid, status=status, at=now - ago, email=email, **names)["id"])

        zoe = make("zoe@example.com", first_name="Zoë", last_name="Ó Briain-Łukasz 🦊")
        rtl = make("maryam@example.com", first_name="مريم", last_name="العلي")
        long = make("long@example.com", first_name=LONG_FIRST, last_name=LONG_LAST)
        blank = make("blank@example.com", first_name="   ", last_name="\t ", shipping_name="  ",
                     shipping_company=" ")
        plus_upper = make("  Ann+Shop@Example.COM ", first_name="Ann", last_name="Lee")
        plus_lower = make("ann+shop@example.com", first_name="Ann", last_name="Lee-Park")
        plain = make("ann@example.com", first_name="Ann", last_name="Other")
        backwards = make("back@example.com", status=300)
        cancelled = make("cancel@example.com", status=300)
        flapping = make("flap@example.com", status=100)
        same_a = make("same@example.com", ago=timedelta(seconds=5))
        same_b = make("same@example.com", ago=timedelta(seconds=5))
        ledger = Ledger(w)
        ledger.observe_all()
        bridge = Bridge(tmp_path, sims, [A]).write()
        async with in_process(bridge) as run:
            await run.drain()
            w.set_status(backwards, 100)
            w.set_status(cancelled, 40)
            second = now - timedelta(seconds=5)  # both change within the second they were created in
            w.set_status(same_a, 300, at=second)
            w.set_status(same_b, 300, at=second)
            ledger.observe_all()
            await run.drain()
            for status in (90, 100, 90, 100):  # paused and resumed, each state polled
                w.set_status(flapping, status)
                ledger.observe_all()
                await run.drain()
        assert_delivered_once(sims, bridge, ledger)
        account = sims.account(A)
        ids = {e.unique_id for e in account.events}
        assert f"{backwards}:processing" not in ids  # 300 → 100 is late news, never announced
        assert {f"{backwards}:shipped", f"{cancelled}:shipped", f"{cancelled}:cancelled"} <= ids
        assert [e.unique_id for e in account.events].count(f"{flapping}:processing") == 1
        # One shopper, one metric, one second: only the unique_id tells the two events apart, and both are kept.
        shipped = [e for e in account.events if e.unique_id in (f"{same_a}:shipped", f"{same_b}:shipped")]
        assert len(shipped) == 2
        assert len({(e.profile_id, e.metric, e.time) for e in shipped}) == 1

        def name(email: str) -> tuple[str | None, str | None]:
            profile = account.profile_by_email(email)
            assert profile is not None, email
            return profile.first_name, profile.last_name

        assert name("zoe@example.com") == ("Zoë", "Ó Briain-Łukasz 🦊")
        assert name("maryam@example.com") == ("مريم", "العلي")
        first, last = name("long@example.com")
        assert first == "Å" * MAX_NAME_CHARS
        assert last is not None
        assert 0 < len(last) <= MAX_NAME_CHARS
        assert LONG_LAST.startswith(last)
        assert name("blank@example.com") == (None, None)
        assert name("ann+shop@example.com") == ("Ann", "Lee-Park")  # one profile for both spellings
        assert name("ann@example.com") == ("Ann", "Other")  # a plus-tag is a different address
        assert len([p for p in account.profiles.values() if (p.email or "").startswith("ann")]) == 2
        assert {long, zoe, rtl, blank, plus_upper, plus_lower, plain} <= set(ledger.states)


INVALID_EMAILS = ("not-an-email", "ann@@example.com", "ann smith@example.com", "ann@localhost", "ann@example..com")


async def test_invalid_emails_never_reach_klaviyo(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """1. Five orders whose email is not an address by syntax (no DNS is asked), beside three good ones; a
    hundred more so history goes in bulk. 2. Drain.
    Result: those orders get no profile and no event and cost Klaviyo no request (no 400, no bisection); one
    WARNING names them by order id, never by email; the cycle line and status count them. 3. One is corrected in
    Whiplash. Result: its next change is sent and it leaves the count."""
    caplog.set_level(logging.INFO, logger="klaviyo_bridge")
    async with serve([A]) as sims:
        w = sims.whiplash
        now = datetime.now(UTC).replace(microsecond=0)
        bad = [int(w.create_order(A.cid, status=100, at=now - timedelta(hours=2), email=e)["id"])
               for e in INVALID_EMAILS]
        good = [int(w.create_order(A.cid, status=300, at=now - timedelta(hours=1), email=f"good{i}@example.com")["id"])
                for i in range(3)]
        for i in range(100):
            w.create_order(A.cid, status=100, at=now - timedelta(days=3), email=f"history{i}@example.com")
        ledger = Ledger(w)
        ledger.observe_all()
        bridge = Bridge(tmp_path, sims, [A]).write()
        async with in_process(bridge) as run:
            await run.drain()
            assert (await run.store.counts(A.cid, run.clock.utc())).invalid_email == len(bad)
            assert [row.invalid_email for row in await status_rows(run.settings, run.clock.utc())] == [len(bad)]
            assert any(m.startswith(f"cycle customer={A.cid} ") and f" invalid_email={len(bad)} " in m
                       for m in caplog.messages), caplog.messages
            account = sims.account(A)
            assert not any(e.unique_id.split(":")[0] in {str(b) for b in bad} for e in account.events if e.unique_id)
            assert {f"{g}:shipped" for g in good} <= {e.unique_id for e in account.events}
            assert account.counters.rejections == []
            assert 400 not in account.counters.statuses
            named = [r.getMessage() for r in caplog.records if r.getMessage().startswith("invalid email")]
            assert len(named) == 1
            assert all(str(b) in named[0] for b in bad)
            assert "@example.com" not in caplog.text
            assert "localhost" not in caplog.text
            assert "not-an-email" not in caplog.text
            w.update_order(bad[0], email="fixed@example.com")
            w.set_status(bad[0], 120)
            ledger.observe_all()
            await run.drain()
            assert (await run.store.counts(A.cid, run.clock.utc())).invalid_email == len(bad) - 1
        assert f"{bad[0]}:processing" in {e.unique_id for e in sims.account(A).events}
        assert_delivered_once(sims, bridge, ledger)
