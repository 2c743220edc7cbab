"""The console entry point: exit codes and what ops see for good and bad configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from klaviyo_bridge.cli import main
from klaviyo_bridge.exits import EX_CONFIG, EX_OK, EX_USAGE

REPO = Path(__file__).resolve().parents[1]
SECRET = "pk_do_not_print_me_123456"


@pytest.fixture
def creds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Provide the credentials config.example.toml refers to."""
    d = tmp_path / "creds"
    d.mkdir()
    for name in ("whiplash-client-secret", "klaviyo-1234", "klaviyo-5678"):
        (d / name).write_text(SECRET + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(d))
    return d


def example_with_state_in(folder: Path) -> Path:
    """Return a copy of config.example.toml whose state DB lives in ``folder`` (which exists)."""
    text = (REPO / "config.example.toml").read_text()
    patched = text.replace('"/var/lib/klaviyo-bridge/state.db"', f'"{folder / "state.db"}"')
    assert patched != text
    path = folder / "config.toml"
    path.write_text(patched)
    return path


def test_check_config_accepts_the_example(creds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1. check-config on config.example.toml (state folder moved to a temporary one).
    Result: exit 0, a summary line, no secret printed."""
    assert main(["check-config", "--config", str(example_with_state_in(tmp_path))]) == EX_OK
    out = capsys.readouterr()
    assert "config ok: 2 customers (1 enabled)" in out.out
    assert "webhooks: off, polling only every 60 s" in out.out
    assert SECRET not in out.out + out.err


def test_check_config_shows_the_webhook_receiver(
    creds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1. The example with its [webhooks] block uncommented and a 300 s backstop poll. Result: exit 0; one line
    with listen, path, where the key comes from (never the key) and the backstop interval."""
    path = example_with_state_in(tmp_path)
    text = path.read_text().replace("# [webhooks]\n# listen", "[webhooks]\nlisten")
    path.write_text(text.replace("poll_interval_seconds = 60.0", "poll_interval_seconds = 300.0"))
    assert main(["check-config", "--config", str(path)]) == EX_OK
    out = capsys.readouterr().out
    assert ("webhooks: on listen=127.0.0.1:8787 (or the socket systemd passes) path=/whiplash/webhook "
            "key=whiplash.client_secret max_body_bytes=1048576; backstop poll every 300 s") in out
    assert SECRET not in out


BAD = """
[bridge]
state_path = "/tmp/x.db"
poll_interval_seconds = 0
colour = "blue"
[whiplash]
client_id = "c"
client_secret = "env:NOPE_NOT_SET_ANYWHERE"
[klaviyo]
default_profile_email = "ops@example.com"
rate_limit_share = 1.5
[[customers]]
whiplash_customer_id = 7
name = "A"
klaviyo_api_key = "env:NOPE_NOT_SET_ANYWHERE"
launch_date = 2026-01-01
backfill_days = 30
[[customers]]
whiplash_customer_id = 7
name = "B"
klaviyo_api_key = "pk_literal_value_in_file"
launch_date = 2026-01-01
"""


@pytest.mark.parametrize("command", [["check-config"], ["run"], ["run", "--once"], ["status"]])
def test_bad_config_gives_one_line_per_problem_and_exit_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """1. A config with six problems. 2. Each command that loads it.
    Result: exit 78, one `config error:` line per problem naming its key path, no traceback."""
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    assert main([*command, "--config", str(path)]) == EX_CONFIG
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("config error: ")]
    paths = sorted(line.split(": ")[1].split(":")[0] for line in lines)
    # status reads no secret, so it cannot find them missing; the others resolve them.
    secrets = [] if command == ["status"] else ["whiplash.client_secret", "customers[0].klaviyo_api_key"]
    assert paths == sorted([
        "bridge.poll_interval_seconds",
        "bridge.colour",
        "klaviyo.rate_limit_share",
        "customers[0].backfill_days",
        *secrets,
    ])
    assert "Traceback" not in err
    assert "pk_literal_value_in_file" not in err


@pytest.mark.parametrize("command", [["check-config"], ["run"]])
def test_bad_webhook_settings_stop_run_with_78(
    creds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """1. The example with [webhooks] listen = "8787", a path without "/" and an unresolvable secret.
    Result: exit 78 before anything starts, one line per problem, naming each key and no secret."""
    path = example_with_state_in(tmp_path)
    bad = '\n[webhooks]\nlisten = "8787"\npath = "hook"\nsecret = "env:NO_SUCH_HOOK_KEY"\n'
    path.write_text(path.read_text() + bad)
    assert main([*command, "--config", str(path)]) == EX_CONFIG
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("config error: ")]
    assert sorted(line.split(": ")[1] for line in lines) == ["webhooks.listen", "webhooks.path", "webhooks.secret"]


@pytest.mark.parametrize("command", [["check-config"], ["run"]])
def test_a_bad_choice_of_events_stops_run_with_78(
    creds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """1. The example whose first merchant lists "delivred" among its events and gives an empty metric name.
    Result: exit 78 before anything starts, one line per problem, each naming its key."""
    path = example_with_state_in(tmp_path)
    text = path.read_text()
    chosen = 'events = ["processing", "cancelled", "shipped", "delivered"]'
    assert chosen in text
    path.write_text(text.replace(chosen, 'events = ["delivred", "shipped"]\n'
                                         '[customers.metrics]\nshipped = ""', 1))
    assert main([*command, "--config", str(path)]) == EX_CONFIG
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("config error: ")]
    assert sorted(line.split(": ")[1] for line in lines) == [
        "customers[0].events[0]", "customers[0].metrics.shipped"], lines


def test_mistyped_state_folder_fails_check_config(creds: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """1. The example with state_path in a folder that does not exist. 2. check-config.
    Result: exit 78 with one line naming bridge.state_path; the folder is not created."""
    path = example_with_state_in(tmp_path)
    path.write_text(path.read_text().replace(str(tmp_path / "state.db"), str(tmp_path / "typo" / "state.db")))
    assert main(["check-config", "--config", str(path)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("config error:")] == [
        f"config error: bridge.state_path: folder {tmp_path / 'typo'} does not exist; "
        "create it (systemd's StateDirectory= does) or fix the path"
    ]
    assert not (tmp_path / "typo").exists()


def test_missing_file_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1. check-config on a path that does not exist. Result: exit 78 and the path in the message."""
    missing = tmp_path / "nope.toml"
    assert main(["check-config", "--config", str(missing)]) == EX_CONFIG
    assert str(missing) in capsys.readouterr().err


def test_default_config_path_comes_from_the_environment(
    creds: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """1. KLAVIYO_BRIDGE_CONFIG points at the example; no --config. Result: it is the file checked."""
    monkeypatch.setenv("KLAVIYO_BRIDGE_CONFIG", str(example_with_state_in(creds.parent)))
    assert main(["check-config"]) == EX_OK
    assert "config ok" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["resync", "--customer", "101", "--since", "yesterday"],
        ["resync", "--customer", "abc", "--since", "2026-11-20"],
        ["resync", "--since", "2026-11-20"],  # a required option missing
        ["dead-letters", "list", "--customer", "x"],
        ["status", "--json", "--check"],  # exclusive options
        ["no-such-command"],
        [],
    ],
)
def test_a_malformed_command_line_exits_64(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """1. A command line argparse cannot parse. Result: exit 64 (EX_USAGE, not argparse's 2, which status uses
    for "unhealthy"), the usage and one error line on stderr, no traceback."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == EX_USAGE
    err = capsys.readouterr().err
    assert "usage: klaviyo-bridge" in err
    assert "error:" in err
    assert "Traceback" not in err


def test_help_is_plain_text_and_lists_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    """1. --help. Result: exit 0; every exit code with its meaning; no markup (backticks, double colons)."""
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for code in ("0 ", "1 ", "2 ", "64", "75", "78"):
        assert f"\n  {code}" in out, code
    assert "`" not in out
    assert "::" not in out


def test_dead_letters_for_an_unknown_customer_says_so(tmp_path: Path, creds: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """1. dead-letters list / replay --customer 999 (not in the config). Result: exit 64 and a line saying so."""
    cfg = example_with_state_in(tmp_path)
    for action in ("list", "replay"):
        assert main(["dead-letters", action, "--customer", "999", "--config", str(cfg)]) == EX_USAGE
        assert "customer 999 is not in the config" in capsys.readouterr().err
