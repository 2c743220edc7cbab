"""Mutation testing of the pure modules, each against its own tests, scored honestly (``make mutate``).

    python tests/mutation/run.py [--floor PCT] [--suggest] [MODULE ...]

For each module (default: all of ``MODULES``), one mutmut run:
1. the package, the tests and ``pyproject.toml`` are copied to ``mutants/<module>/``, whose ``[tool.mutmut]``
   gets ``only_mutate`` = that module and ``pytest_add_cli_args_test_selection`` = its own test file(s); mutmut
   works in the current directory (it copies it again to ``mutants/``), so each module has its own;
2. ``mutmut run`` runs there from scratch (its output goes to ``mutants/<module>/mutmut.log``);
3. every mutant not killed is looked up in ``tests/mutation/equivalents.toml``, the list of mutants that change
   nothing observable. A mutant is identified by module, function and its changed line(s) before and after,
   never by mutmut's numbered name (the numbers shift whenever code is added above).

Score = killed / (mutants - listed equivalents); a timeout counts as killed (the mutant hangs, a test notices),
and a mutant of a function that none of the module's tests call ("no tests") counts as a survivor. mutmut swaps
functions at call time, so code that runs only at import (module constants, factories called at import) is
never mutated: pin constants with direct tests instead.
Exit status 1 when a module scores below its floor, when mutmut fails, or when an entry of the list matches
no surviving mutant of a module that ran (stale: the line changed or a test now kills it; delete the entry).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "klaviyo_bridge"
EQUIVALENTS = ROOT / "tests" / "mutation" / "equivalents.toml"
WORK = ROOT / "mutants"


@dataclass(frozen=True)
class Module:
    """One module to mutate: the test files that must kill its mutants, and the lowest score accepted."""

    tests: tuple[str, ...]
    floor: float


MODULES: dict[str, Module] = {
    "core": Module(("tests/test_core.py",), floor=97.0),
    "orders": Module(("tests/test_orders.py",), floor=97.0),
    "ratelimit": Module(("tests/test_ratelimit.py",), floor=97.0),
    "slices": Module(("tests/test_slices.py",), floor=97.0),
    "config": Module(("tests/test_config.py",), floor=97.0),
    "config_fields": Module(("tests/test_config.py",), floor=97.0),
    "config_secrets": Module(("tests/test_config.py",), floor=97.0),
    "config_problems": Module(("tests/test_config.py",), floor=97.0),
    "config_env": Module(("tests/test_config.py",), floor=97.0),
}


class Failed(Exception):
    """A module could not be scored (mutmut failed or left mutants unchecked)."""


KILLED = frozenset({"killed", "timeout"})
# Statuses that mean the run did not finish: the score would be a guess.
UNFINISHED = frozenset({"not checked", "check was interrupted by user"})


@dataclass(frozen=True)
class Change:
    """A mutant as a person reads it: which function, and its changed line(s) before and after."""

    module: str
    function: str
    before: str
    after: str


@dataclass(frozen=True)
class Equivalent:
    """One entry of the allow-list: a change that no test can observe, and why."""

    change: Change
    why: str
    count: int  # how many mutants of the function make exactly this change (usually 1)


@dataclass
class Score:
    """What one module's run found."""

    module: str
    total: int
    killed: int
    equivalent: int
    survivors: list[tuple[str, str, Change]]  # (mutmut name, status, change) not killed, not listed
    stale: list[Equivalent]
    seconds: float

    @property
    def percent(self) -> float:
        """Return killed / (mutants - listed equivalents), in percent."""
        judged = self.total - self.equivalent
        return 100.0 * self.killed / judged if judged else 100.0


# ---------------------------------------------------------------- allow-list


def load_equivalents(path: Path = EQUIVALENTS) -> list[Equivalent]:
    """Read the allow-list; each entry names module, function, before, after and why."""
    entries = tomllib.loads(path.read_text("utf-8")).get("equivalent", [])
    loaded = []
    for index, entry in enumerate(entries):
        missing = {"module", "function", "before", "after", "why"} - entry.keys()
        if missing or not str(entry.get("why", "")).strip():
            raise SystemExit(f"{path}: equivalent[{index}] needs module, function, before, after and a why")
        change = Change(entry["module"], entry["function"], _norm(entry["before"]), _norm(entry["after"]))
        loaded.append(Equivalent(change, entry["why"], int(entry.get("count", 1))))
    repeated = [c for c, n in Counter(e.change for e in loaded).items() if n > 1]
    if repeated:
        raise SystemExit(f"{path}: listed twice: {repeated[0]}")
    return loaded


def _norm(text: str) -> str:
    """Normalise changed lines: indentation and trailing spaces never identify a mutant."""
    return "\n".join(line.strip() for line in text.strip().splitlines())


# ---------------------------------------------------------------- one module


def stage(module: str, spec: Module) -> Path:
    """Lay out ``mutants/<module>/`` afresh: package, tests, and a pyproject that mutates only ``module``."""
    missing = [test for test in spec.tests if not (ROOT / test).is_file()]
    if missing:
        raise Failed(f"{module}: no test file {', '.join(missing)}")
    here = WORK / module
    shutil.rmtree(here, ignore_errors=True)
    here.mkdir(parents=True)
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")
    shutil.copytree(ROOT / PACKAGE, here / PACKAGE, ignore=junk)
    shutil.copytree(ROOT / "tests", here / "tests", ignore=junk)
    pyproject = (ROOT / "pyproject.toml").read_text("utf-8")
    shared = tomllib.loads(pyproject).get("tool", {}).get("mutmut", {})
    for extra in shared.get("also_copy", []):  # files the tests read, e.g. config.example.toml
        if (ROOT / extra).is_dir():
            shutil.copytree(ROOT / extra, here / extra, ignore=junk)
        else:
            (here / extra).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / extra, here / extra)
    settings = {
        **shared,
        "only_mutate": [f"{PACKAGE}/{module}.py"],
        "pytest_add_cli_args_test_selection": list(spec.tests),
    }
    text = _without_table(pyproject, "tool.mutmut") + "\n[tool.mutmut]\n"
    text += "".join(f"{key} = {json.dumps(value, ensure_ascii=False)}\n" for key, value in settings.items())
    if tomllib.loads(text)["tool"]["mutmut"] != settings:  # json and TOML agree on the value types used here
        raise Failed(f"cannot express [tool.mutmut] for {module} in TOML: {settings}")
    (here / "pyproject.toml").write_text(text, "utf-8")
    return here


def _without_table(text: str, table: str) -> str:
    """Return TOML text without one top-level ``[table]`` (header to the next header)."""
    kept, inside = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("["):
            inside = line.strip() == f"[{table}]"
        if not inside:
            kept.append(line)
    return "".join(kept)


def mutmut(here: Path, *args: str, answer: bool = True) -> str:
    """Run the mutmut next to this interpreter in ``here``; return its output, or raise showing its end.

    Everything it prints goes to ``here/mutmut.log``; without ``answer`` as it comes (``tail -f`` a long run).
    """
    exe = Path(sys.executable).parent / "mutmut"
    log = here / "mutmut.log"
    with log.open("a", encoding="utf-8") as sink:
        sink.write(f"$ mutmut {' '.join(args)}\n")
        sink.flush()
        out = subprocess.PIPE if answer else sink
        done = subprocess.run([str(exe), *args], cwd=here, stdout=out, stderr=sink, text=True, check=False)
        sink.write(done.stdout or "")
    if done.returncode != 0:
        tail = "\n".join(log.read_text("utf-8", errors="replace").splitlines()[-40:])
        raise Failed(f"mutmut {' '.join(args)} failed in {here} (exit {done.returncode}):\n{tail}")
    return done.stdout or ""


def statuses(here: Path) -> dict[str, str]:
    """Return every mutant's status, by mutmut name."""
    found = {}
    for line in mutmut(here, "results", "--all", "true").splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            found[name] = status
    return found


def change_of(here: Path, module: str, name: str) -> Change:
    """Describe one mutant by its function and changed lines, from ``mutmut show``."""
    removed, added = [], []
    for line in mutmut(here, "show", name).splitlines():
        if line.startswith(("---", "+++")):
            continue
        if line.startswith("-"):
            removed.append(line[1:])
        elif line.startswith("+"):
            added.append(line[1:])
    return Change(module, function_of(name), _norm("\n".join(removed)), _norm("\n".join(added)))


def function_of(name: str) -> str:
    """Return ``Class.method`` or ``function`` from a mutmut name like ``pkg.mod.xǁClassǁmethod__mutmut_3``."""
    mangled = name.partition("__mutmut_")[0].rpartition(".")[2]
    if "ǁ" in mangled:
        _, cls, method = mangled.split("ǁ")
        return f"{cls}.{method}"
    return mangled.removeprefix("x_")


def score(module: str, spec: Module, equivalents: Sequence[Equivalent]) -> Score:
    """Mutate ``module``, run its own tests against every mutant and score the result."""
    started = time.monotonic()
    here = stage(module, spec)
    mutmut(here, "run", answer=False)
    found = statuses(here)
    unfinished = sorted(name for name, status in found.items() if status in UNFINISHED)
    if not found or unfinished:
        raise Failed(f"mutmut left {module} unfinished ({len(unfinished)} of {len(found)} mutants)")
    alive = [(name, status, change_of(here, module, name)) for name, status in found.items() if status not in KILLED]
    listed = [e for e in equivalents if e.change.module == module]
    matched, survivors = _match(alive, listed)
    return Score(
        module=module,
        total=len(found),
        killed=sum(status in KILLED for status in found.values()),
        equivalent=sum(matched.values()),
        survivors=survivors,
        stale=[e for e in listed if matched[e.change] != e.count],
        seconds=time.monotonic() - started,
    )


def _match(
    alive: Iterable[tuple[str, str, Change]], listed: Sequence[Equivalent]
) -> tuple[Counter[Change], list[tuple[str, str, Change]]]:
    """Split mutants not killed into listed equivalents (counted per entry) and real survivors."""
    allowed = {e.change: e.count for e in listed}
    matched: Counter[Change] = Counter()
    survivors = []
    for name, status, change in sorted(alive):
        # Only a surviving mutant can be equivalent: "no tests" means no test of the module ran the function.
        if status == "survived" and matched[change] < allowed.get(change, 0):
            matched[change] += 1
        else:
            survivors.append((name, status, change))
    return matched, survivors


# ---------------------------------------------------------------- report


def report(scores: Sequence[Score], floors: dict[str, float], suggest: bool) -> bool:
    """Print survivors, stale entries and one line per module; return whether every module passed."""
    ok = True
    for s in scores:
        for name, status, change in s.survivors:
            print(f"\n{status}: {name} ({change.function})\n  - {_indent(change.before)}\n  + {_indent(change.after)}")
            if suggest:
                print(_suggestion(change))
        for entry in s.stale:
            ok = False
            print(f"\nstale equivalent (matches no surviving mutant; delete it from {EQUIVALENTS.name}):")
            print(f"  {entry.change.module}.{entry.change.function}\n  - {_indent(entry.change.before)}")
            print(f"  + {_indent(entry.change.after)}")
    header = ("module", "mutants", "killed", "survived", "equivalent", "score", "floor")
    print("\n{:<10} {:>7} {:>7} {:>8} {:>10} {:>7} {:>6}  time".format(*header))
    for s in scores:
        floor = floors[s.module]
        passed = s.percent >= floor
        ok = ok and passed
        print(
            f"{s.module:<10} {s.total:>7} {s.killed:>7} {len(s.survivors):>8} {s.equivalent:>10} "
            f"{s.percent:>6.1f}% {floor:>5.0f}%  {s.seconds:.0f}s{'' if passed else '  BELOW FLOOR'}"
        )
    return ok


def _indent(text: str) -> str:
    return text.replace("\n", "\n    ") or "(nothing)"


def _suggestion(change: Change) -> str:
    """Return an allow-list entry for ``change``, to paste once the mutant is shown to be equivalent."""
    lines = ["[[equivalent]]"]
    for key in ("module", "function", "before", "after"):
        lines.append(f"{key} = {_toml_string(getattr(change, key))}")
    lines.append('why = ""')
    return "\n".join(lines)


def _toml_string(text: str) -> str:
    """Quote ``text`` for TOML: a literal string when it can be one (easier to read), else a basic string."""
    if "'" in text or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    return f"'{text}'"


def main(argv: Sequence[str] | None = None) -> int:
    """Score the modules named on the command line (default all) and return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"any of {', '.join(MODULES)} (default: all)")
    parser.add_argument("--floor", type=float, help="lowest score accepted, in percent (default: per module)")
    parser.add_argument("--suggest", action="store_true", help="print an allow-list entry for each survivor")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    modules: list[str] = list(dict.fromkeys(args.modules)) or list(MODULES)
    floors = {m: MODULES[m].floor if args.floor is None else args.floor for m in modules}
    equivalents = load_equivalents()
    started = time.monotonic()
    scores, failed = [], []
    for module in modules:
        print(f"mutating {PACKAGE}/{module}.py against {', '.join(MODULES[module].tests)}", flush=True)
        try:
            scores.append(score(module, MODULES[module], equivalents))
        except Failed as exc:
            print(exc, flush=True)
            failed.append(module)
    ok = report(scores, floors, args.suggest) and not failed
    print(f"{len(modules)} module(s) in {time.monotonic() - started:.0f}s: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
