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

A slice's ``reached`` key means: every order of the slice's range with a key up to it was read and committed.
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
    reached: Key
    read: int = 0  # orders read so far
    done: bool = False
    held: bool = False  # a malformed order stopped its progress: the cursor waits before it

    @property
    def complete(self) -> bool:
        """Tell whether every order of the range is committed (the cursor may pass the whole slice)."""
        return self.done and not self.held


def first_slice(since: datetime) -> Slice:
    """Return the one slice a walk starts with: everything changed at or after ``since``."""
    return Slice(since, None, (since, 0))


def even_slices(since: datetime, end: datetime, count: int) -> list[Slice]:
    """Return ``count`` slices of equal span from ``since`` to ``end``, the last one open-ended.

    For a window known to be long (a backfill, a catch-up): every reader starts at once instead of waiting for
    the first page to show how dense the window is.
    """
    if count <= 1 or end <= since:
        return [first_slice(since)]
    step = (end - since) / count
    starts = [_whole_ms(since + step * i) for i in range(count)]
    return [Slice(start, starts[i + 1] if i + 1 < count else None, (start, 0)) for i, start in enumerate(starts)]


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
        s.reached = max(s.reached, safe_key) if safe_key is not None else s.reached
        return
    if last_key is not None:
        s.reached = max(s.reached, last_key)


def finished(s: Slice) -> None:
    """Record that the walk of ``s`` read its whole range: its end is reached (unless it is held)."""
    s.done = True
    if not s.held and s.until is not None:
        s.reached = max(s.reached, (s.until, 0))


def contiguous_cursor(slices: list[Slice]) -> Key:
    """Return the end of the committed prefix: past every complete slice, up to the first incomplete one's progress."""
    ordered = sorted(slices, key=lambda s: s.start)
    cursor = ordered[0].reached
    for s in ordered:
        cursor = max(cursor, s.reached)
        if not s.complete:
            break
    return cursor


def remaining(s: Slice, end: datetime, page_size: int) -> float:
    """Estimate the pages left in ``s`` from the density it read so far (0 when nothing is known yet)."""
    upper = s.until if s.until is not None else end
    read_span = (s.reached[0] - s.start).total_seconds()
    left_span = (upper - s.reached[0]).total_seconds()
    if s.done or s.held or s.read == 0 or left_span <= 0:
        return 0.0
    # A slice whose first page covered no time at all (a burst at one instant) is dense: assume a page per second.
    density = s.read / read_span if read_span > 0 else float(page_size)
    return density * left_span / page_size


def split_point(s: Slice, end: datetime, page_size: int) -> datetime | None:
    """Return where to split ``s`` so another reader takes its second half, or None when not worth it."""
    if remaining(s, end, page_size) <= MIN_SPLIT_PAGES:
        return None
    upper = s.until if s.until is not None else end
    middle = s.reached[0] + (upper - s.reached[0]) / 2
    if middle - s.reached[0] < MIN_SPLIT_SPAN:
        return None
    return _whole_ms(middle)


def split(slices: list[Slice], victim: Slice, at: datetime) -> Slice:
    """Cut ``victim`` at ``at``: it keeps [start, at), the returned new slice takes [at, its old until)."""
    taken = Slice(at, victim.until, (at, 0))
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
