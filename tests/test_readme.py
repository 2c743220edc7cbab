"""The README's install steps, followed literally, give a config that check-config accepts.

The block is run as written, in a copy of this checkout, with one change: the system paths it installs to
(/opt/klaviyo-bridge, /etc/klaviyo-bridge, /var/lib/klaviyo-bridge, /etc/systemd/system) are moved under a
temporary root, in the block and in the copied config.example.toml alike, so the test needs no root and
touches nothing outside its folder. It builds a real virtualenv and installs the package from the copy.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PATHS = ("/opt/klaviyo-bridge", "/etc/klaviyo-bridge", "/var/lib/klaviyo-bridge", "/etc/systemd/system")
SKIPPED_WHEN_COPYING = {".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", "mutants", "build"}


def install_block(readme: str) -> str:
    """Return the first ```sh block of the README's "## Install" section."""
    section = readme.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert match, "no ```sh block in the README's Install section"
    return match.group(1)


def relocated(text: str, root: Path) -> str:
    """Move every system path the install writes to under ``root``."""
    for path in SYSTEM_PATHS:
        text = text.replace(path, f"{root}{path}")
    return text


def copy_checkout(dest: Path) -> None:
    """Copy this checkout (without caches, virtualenvs and git data) to ``dest``."""
    shutil.copytree(REPO, dest, ignore=lambda _dir, names: [n for n in names if n in SKIPPED_WHEN_COPYING
                                                              or n.endswith((".egg-info", "__pycache__"))])


@pytest.mark.timeout(600)
def test_install_steps_as_written_give_a_config_check_config_accepts(tmp_path: Path) -> None:
    """1. A clean root with only /etc/systemd/system. 2. The README's install block, line by line, in bash with
    -e. Result: every step succeeds and its last step, check-config on the installed example config, exits 0
    with "config ok: 2 customers (1 enabled)": the disabled customer's credential is not needed, the state
    folder exists, and the credentials the unit loads are the ones the config refers to."""
    root = tmp_path / "root"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    checkout = tmp_path / "checkout"
    copy_checkout(checkout)
    example = checkout / "config.example.toml"
    example.write_text(relocated(example.read_text(), root))
    script = relocated(install_block((REPO / "README.md").read_text()), root)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "CREDENTIALS_DIRECTORY",
                                                                    "KLAVIYO_BRIDGE", "PYTHON"))}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=checkout, env=env,
                            capture_output=True, text=True, timeout=540, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "config ok: 2 customers (1 enabled)" in result.stdout
    assert "config error" not in result.stderr
    credentials = root / "etc" / "klaviyo-bridge" / "credentials"
    assert sorted(p.name for p in credentials.iterdir()) == ["klaviyo-1234", "whiplash-client-secret"]
    assert oct((credentials / "klaviyo-1234").stat().st_mode & 0o777) == "0o600"
    unit = (root / "etc" / "systemd" / "system" / "klaviyo-bridge.service").read_text()
    loaded = set(re.findall(r"^LoadCredential=([\w-]+):", unit, re.MULTILINE))
    referenced = set(re.findall(r'"credential:([\w-]+)"', example.read_text()))
    enabled_refs = {"whiplash-client-secret", "klaviyo-1234"}
    assert enabled_refs <= loaded, "the unit must load every credential an enabled customer refers to"
    assert loaded <= referenced
