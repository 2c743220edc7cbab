"""Helpers shared by the suites that run the real bridge process (tests/e2e, tests/system, tests/faults)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def toml_str(value: str) -> str:
    """Quote a TOML basic string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def patch_example(text: str, values: dict[str, dict[str, str]]) -> str:
    """Replace ``key = value`` lines per section of config.example.toml and drop its customers."""
    head = text.split("[[customers]]", 1)[0]
    out: list[str] = []
    section = ""
    for line in head.splitlines():
        m = re.match(r"^\[(\w+)\]", line)
        if m:
            section = m.group(1)
        kv = re.match(r"^#?\s*(\w+)\s*=", line)
        if kv and kv.group(1) in values.get(section, {}):
            line = f"{kv.group(1)} = {values[section].pop(kv.group(1))}"
        out.append(line)
    leftovers = {s: k for s, k in values.items() if k}
    assert not leftovers, f"keys not found in config.example.toml: {leftovers}"
    return "\n".join(out) + "\n"


async def eventually(check: Callable[[], T], *, limit_s: float = 20.0, what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy, failing with ``what`` after ``limit_s`` seconds."""
    deadline = time.monotonic() + limit_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {limit_s}s waiting for {what}"
        await asyncio.sleep(0.05)


class LoggedProcess:
    """A bridge subprocess whose output lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        assert proc.stdout is not None
        self._reader = asyncio.create_task(self._read(proc.stdout))

    @property
    def log(self) -> str:
        """Return everything the process logged so far."""
        return "\n".join(self.lines)

    async def _read(self, stream: asyncio.StreamReader) -> None:
        """Collect lines until the process closes its output."""
        async for raw in stream:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._new_line.set()
        self._new_line.set()

    def has_line(self, pattern: str) -> bool:
        """Tell whether a log line matches the regex."""
        regex = re.compile(pattern)
        return any(regex.search(line) for line in self.lines)

    async def wait_for_line(self, pattern: str, limit_s: float = 15.0) -> str:
        """Return the first log line matching ``pattern`` (a regex), waiting up to ``limit_s`` seconds."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + limit_s
        while True:
            match = next((line for line in self.lines if regex.search(line)), None)
            if match is not None:
                return match
            left = deadline - time.monotonic()
            assert left > 0, f"no log line matching {pattern!r} within {limit_s}s; log:\n{self.log}"
            assert not self._reader.done(), f"bridge exited before logging {pattern!r}; log:\n{self.log}"
            self._new_line.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_line.wait(), left)

    async def closed(self) -> None:
        """Wait until every log line has been read."""
        await asyncio.wait_for(self._reader, 10.0)
