"""Pure bookkeeping of a window read as several time slices at once: where to split, how far the cursor may go.

A long window (an onboarding backfill, a resync, catching up after an outage) is read faster as several keyset
walks side by side, each over its own range of ``updated_at``. This module decides, without I/O:

- where a slice is split, when an idle reader could take half of what is left of a busy one
  (``split_point``: only when the rest is estimated at more than ``MIN_SPLIT_PAGES`` pages, from the density
  the slice has read so far, so a short window costs no extra request);
- how far the customer's cursor may move (``contiguous_cursor``): to the end of the committed prefix. Slices are
  ordered by their start; the cursor takes every slice that is finished, and stops at the progress of the first
  one that is not (or that holds a malformed order). Everything at or before the cursor has been committed, so
  a crash anywhere resumes without a gap.

A slice's ``reached`` key means: every order of the slice's range with a key up to it was read and committed
(None: nothing yet). The cursor is always the key of an order Whiplash returned, never a slice bound: bounds come
from our clock, and a Whiplash clock behind ours would otherwise let a cursor pass orders it stamps later.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

Key = tuple[datetime, int]

MIN_SPLIT_PAGES = 1.5  # a split costs one more request (the new slice's last, partial page): worth it above this
MIN_SPLIT_SPAN = timedelta(seconds=2)  # never split finer than this: Whiplash's timestamps are whole milliseconds


@dataclass(slots=True)
class Slice:
    """One range [start, until) of ``updated_at`` (``until`` None: open-ended, the last slice)."""

    start: datetime
    until: datetime | None
    reached: Key | None = None
    read: int = 0  # orders read so far
    done: bool = False
    held: bool = False  # a malformed order stopped its progress: the cursor waits before it

    @property
    def complete(self) -> bool:
        """Tell whether every order of the range is committed (the cursor may pass the whole slice)."""
        return self.done and not self.held


def first_slice(since: datetime) -> Slice:
    """Return the one slice a walk starts with: everything changed at or after ``since``."""
    return Slice(since, None)


def _whole_ms(at: datetime) -> datetime:
    """Return ``at`` cut to whole milliseconds: what Whiplash's search can compare."""
    return at.replace(microsecond=at.microsecond // 1000 * 1000)


def committed(s: Slice, last_key: Key | None, safe_key: Key | None, orders: int, malformed: bool) -> None:
    """Record a committed page of ``s``: how far it reached, or, with a malformed order, where it is held."""
    s.read += orders
    if s.held:
        return
    if malformed:
        s.held = True
        s.reached = _later(s.reached, safe_key)
        return
    s.reached = _later(s.reached, last_key)


def _later(a: Key | None, b: Key | None) -> Key | None:
    """Return the later of two keys, either of which may be missing."""
    if a is None or b is None:
        return a if b is None else b
    return max(a, b)


def finished(s: Slice) -> None:
    """Record that the walk of ``s`` read its whole range."""
    s.done = True


def contiguous_cursor(slices: list[Slice]) -> Key | None:
    """Return the end of the committed prefix (None: nothing committed in it yet): the latest key of every complete
    slice and of the first incomplete one, which stops it."""
    cursor: Key | None = None
    for s in sorted(slices, key=lambda s: s.start):
        cursor = _later(cursor, s.reached)
        if not s.complete:
            break
    return cursor


def remaining(s: Slice, end: datetime, page_size: int) -> float:
    """Estimate the pages left in ``s`` from the density it read so far (0 when nothing is known yet)."""
    if s.done or s.held or s.read == 0 or s.reached is None:
        return 0.0
    upper = s.until if s.until is not None else end
    read_span = (s.reached[0] - s.start).total_seconds()
    left_span = (upper - s.reached[0]).total_seconds()
    if left_span <= 0:
        return 0.0
    # A slice whose first page covered no time at all (a burst at one instant) is dense: assume a page per second.
    density = s.read / read_span if read_span > 0 else float(page_size)
    return density * left_span / page_size


def split_point(s: Slice, end: datetime, page_size: int) -> datetime | None:
    """Return where to split ``s`` so another reader takes its second half, or None when not worth it."""
    if s.reached is None or remaining(s, end, page_size) <= MIN_SPLIT_PAGES:
        return None
    upper = s.until if s.until is not None else end
    middle = s.reached[0] + (upper - s.reached[0]) / 2
    if middle - s.reached[0] < MIN_SPLIT_SPAN:
        return None
    return _whole_ms(middle)


def split(slices: list[Slice], victim: Slice, at: datetime) -> Slice:
    """Cut ``victim`` at ``at``: it keeps [start, at), the returned new slice takes [at, its old until)."""
    taken = Slice(at, victim.until)
    victim.until = at
    slices.append(taken)
    return taken


def best_split(busy: list[Slice], end: datetime, page_size: int) -> tuple[Slice, datetime] | None:
    """Return the busy slice with the most pages left and where to split it, or None when none is worth it."""
    for s in sorted(busy, key=lambda s: remaining(s, end, page_size), reverse=True):
        at = split_point(s, end, page_size)
        if at is not None:
            return s, at
    return None
