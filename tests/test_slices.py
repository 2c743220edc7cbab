"""Pure bookkeeping of sliced reads (klaviyo_bridge.slices): splits, and a cursor that never passes an unread order."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from klaviyo_bridge import slices
from klaviyo_bridge.slices import Key, Slice

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_first_slice_is_the_whole_open_window() -> None:
    s = slices.first_slice(at(0))
    assert (s.start, s.until, s.reached, s.read, s.done, s.held) == (at(0), None, None, 0, False, False)


def test_committed_pages_move_reached_and_a_malformed_order_holds_it() -> None:
    """1. A page reaching (t10, 5). 2. A page with a malformed order after a good one at (t12, 7). 3. Another page.
    Result: reached (t10, 5), then held at (t12, 7) for good; read counts every order."""
    s = slices.first_slice(at(0))
    slices.committed(s, (at(10), 5), (at(10), 5), 3, False)
    assert (s.reached, s.read, s.held) == ((at(10), 5), 3, False)
    slices.committed(s, (at(15), 9), (at(12), 7), 4, True)
    assert (s.reached, s.read, s.held) == ((at(12), 7), 7, True)
    slices.committed(s, (at(20), 11), (at(20), 11), 2, False)
    assert (s.reached, s.read, s.held) == ((at(12), 7), 9, True)
    slices.finished(s)
    assert (s.done, s.complete, s.reached) == (True, False, (at(12), 7))


def test_a_malformed_first_order_keeps_reached_where_it_was() -> None:
    s = slices.first_slice(at(0))
    slices.committed(s, (at(10), 5), (at(10), 5), 3, False)
    slices.committed(s, (at(11), 6), None, 1, True)
    assert (s.reached, s.held) == ((at(10), 5), True)


def test_a_finished_slice_keeps_the_last_key_it_read() -> None:
    """A finished slice is complete, but its reached key stays the last order it read: never its bound (our clock),
    and nothing when it read nothing."""
    bounded = Slice(at(0), at(100), (at(40), 3), read=10)
    slices.finished(bounded)
    assert (bounded.reached, bounded.done, bounded.complete) == ((at(40), 3), True, True)
    empty = Slice(at(0), at(100))
    slices.finished(empty)
    assert (empty.reached, empty.complete) == (None, True)


def test_cursor_is_the_end_of_the_committed_prefix() -> None:
    """Slices [0,100) complete at t90, [100,200) at t150, [200,…) complete at t300. Result: the cursor stops at t150;
    once the middle one finishes, t300. A held slice stops it at its own progress; an untouched one at the keys
    before it; nothing read at all: no cursor."""
    a = Slice(at(0), at(100), (at(90), 1), read=5, done=True)
    b = Slice(at(100), at(200), (at(150), 4), read=5)
    c = Slice(at(200), None, (at(300), 9), read=5, done=True)
    assert slices.contiguous_cursor([c, a, b]) == (at(150), 4)
    slices.finished(b)
    assert slices.contiguous_cursor([c, a, b]) == (at(300), 9)
    held = Slice(at(0), at(100), (at(30), 2), read=5, done=True, held=True)
    assert slices.contiguous_cursor([held, b, c]) == (at(30), 2)
    untouched = Slice(at(100), at(200))
    assert slices.contiguous_cursor([a, untouched, c]) == (at(90), 1)
    assert slices.contiguous_cursor([Slice(at(0), at(100), done=True), Slice(at(100), None)]) is None
    empty_done = Slice(at(100), at(200), done=True)
    assert slices.contiguous_cursor([a, empty_done, c]) == (at(300), 9)


def test_remaining_is_estimated_from_the_density_read() -> None:
    """100 orders read over the first 10 s of a 100 s window: 900 more expected, 9 pages of 100."""
    s = Slice(at(0), None, (at(10), 1), read=100)
    assert slices.remaining(s, at(100), 100) == 9.0
    assert slices.remaining(Slice(at(0), at(50), (at(10), 1), read=100), at(100), 100) == 4.0
    assert slices.remaining(Slice(at(0), None), at(100), 100) == 0.0  # nothing read: unknown
    burst = Slice(at(0), None, (at(0), 77), read=100)  # the first page covered no time at all: dense
    assert slices.remaining(burst, at(100), 100) == 100.0
    assert slices.remaining(Slice(at(0), None, (at(10), 1), read=100, done=True), at(100), 100) == 0.0
    assert slices.remaining(Slice(at(0), None, (at(10), 1), read=100, held=True), at(100), 100) == 0.0
    assert slices.remaining(Slice(at(0), at(5), (at(10), 1), read=100), at(100), 100) == 0.0


def test_remaining_is_unknown_until_orders_were_read_and_a_key_reached() -> None:
    """Result: 0 (unknown) when orders were read but no key reached, or a key reached with no order read (a page of
    nothing but skipped objects at the slice's very start, where a zero span would otherwise count as dense); one
    order read is enough to estimate."""
    assert slices.remaining(Slice(at(0), None, None, read=5), at(100), 100) == 0.0
    assert slices.remaining(Slice(at(0), None, (at(0), 3), read=0), at(100), 100) == 0.0
    assert slices.remaining(Slice(at(0), None, (at(10), 1), read=1), at(100), 10) == 0.9


def test_a_page_without_a_key_keeps_where_the_slice_reached() -> None:
    """1. A slice has reached second 40. 2. A page with no readable key and no malformed order is committed.
    Result: reached stays at second 40 (a missing key never moves it back to nothing)."""
    s = Slice(at(0), None, (at(40), 7), read=3)
    slices.committed(s, None, None, 0, False)
    assert (s.reached, s.read) == ((at(40), 7), 3)


def test_split_only_when_more_than_one_and_a_half_pages_are_left() -> None:
    """A slice estimated at 9 pages left is split at the middle of what is left (whole milliseconds); one at 1.5
    pages or less, or a span under MIN_SPLIT_SPAN, or one that has read nothing yet, is not."""
    s = Slice(at(0), None, (at(10), 1), read=100)
    assert slices.split_point(s, at(100.0005), 100) == at(55)
    assert slices.split_point(Slice(at(0), None, (at(10), 1), read=15), at(100), 100) is None  # 1.35 pages
    assert slices.split_point(Slice(at(0), None, (at(10), 1), read=20), at(100), 100) == at(55)  # 1.8 pages
    assert slices.split_point(Slice(at(0), None), at(100), 100) is None
    tiny = Slice(at(0), None, (at(0.001), 1), read=100)
    assert slices.split_point(tiny, at(3), 100) is None  # dense, but 1.5 s left: finer than MIN_SPLIT_SPAN


def test_split_cuts_the_victim_and_the_new_slice_takes_the_rest() -> None:
    every = [Slice(at(0), None, (at(10), 1), read=100)]
    taken = slices.split(every, every[0], at(55))
    assert (every[0].until, taken.start, taken.until, taken.reached) == (at(55), at(55), None, None)
    assert every == [every[0], taken]


def test_best_split_takes_the_busiest_slice_worth_splitting() -> None:
    light = Slice(at(0), at(50), (at(10), 1), read=2)  # 8 orders left: 0.8 pages
    heavy = Slice(at(50), None, (at(60), 1), read=100)  # 40 pages left
    assert slices.best_split([light, heavy], at(100), 10) == (heavy, at(80))
    assert slices.best_split([light], at(100), 10) is None


# -- the invariant, over random interleavings -----------------------------------------------------------------


@dataclass
class Reader:
    """A model of one slice's keyset walk: the page in flight, read with the ``until`` of its request time."""

    s: Slice
    position: Key
    in_flight: list[Key] | None = None
    full: bool = False


@dataclass
class Model:
    orders: list[Key]
    page: int
    end: datetime
    committed: set[Key] = field(default_factory=set)

    def fetch(self, r: Reader) -> None:
        upper = r.s.until
        found = [k for k in self.orders if k > r.position and k[0] >= r.s.start and (upper is None or k[0] < upper)]
        r.in_flight = sorted(found)[: self.page]
        r.full = len(r.in_flight) == self.page

    def commit(self, r: Reader, all_slices: list[Slice]) -> None:
        page = r.in_flight or []
        r.in_flight = None
        self.committed.update(page)
        if page:
            r.position = page[-1]
            slices.committed(r.s, page[-1], page[-1], len(page), False)
        if not r.full or (r.s.until is not None and r.position[0] >= r.s.until):
            slices.finished(r.s)
        self.check(all_slices)

    def check(self, all_slices: list[Slice]) -> None:
        cursor = slices.contiguous_cursor(all_slices)
        if cursor is None:
            return
        assert cursor in self.committed, "the cursor is always the key of an order read"
        unread = [k for k in self.orders if k <= cursor and k not in self.committed]
        assert not unread, f"cursor {cursor} passes unread orders {unread[:3]}"


@settings(max_examples=300, deadline=None)
@given(
    times=st.lists(st.integers(0, 10_000), min_size=0, max_size=120),
    page=st.integers(1, 7),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_cursor_never_passes_an_unread_order(times: list[int], page: int, seed: int) -> None:
    """Random orders (many sharing a millisecond), random page sizes, readers interleaved at random, slices split
    at random points — including while the victim's page is in flight under its old end. Result: after every
    commit, every order at or before the cursor is committed; at the end every order is read and the cursor is
    at or past the last one."""
    rng = random.Random(seed)
    orders = sorted({(T0 + timedelta(milliseconds=t), i + 1) for i, t in enumerate(times)})
    end = T0 + timedelta(seconds=10)
    model = Model(orders, page, end)
    every = [slices.first_slice(T0)]
    readers = [Reader(every[0], (T0, 0))]
    while any(not r.s.done for r in readers):
        active = [r for r in readers if not r.s.done]
        r = rng.choice(active)
        roll = rng.random()
        if roll < 0.2:  # split a random busy slice at a random point of what it has left
            upper = r.s.until or end
            low = r.position[0]
            if upper > low:
                cut = low + (upper - low) * rng.random()
                cut = cut.replace(microsecond=cut.microsecond // 1000 * 1000)
                if cut > r.s.start and cut > low:
                    taken = slices.split(every, r.s, cut)
                    readers.append(Reader(taken, (cut, 0)))
        elif r.in_flight is None:
            model.fetch(r)
        else:
            model.commit(r, every)
    assert model.committed == set(orders)
    assert slices.contiguous_cursor(every) == (orders[-1] if orders else None)


def test_slice_bounds_are_whole_milliseconds() -> None:
    """Whiplash compares times to the millisecond: split points are cut to it (990,500 µs → 990 ms)."""
    start = T0.replace(microsecond=990_500)
    s = Slice(start, None, (start, 1), read=1000)
    assert slices.split_point(s, start + timedelta(seconds=10), 10) == T0 + timedelta(seconds=5, milliseconds=990)


def test_remaining_for_spans_under_a_second() -> None:
    """100 orders read over half a second, half a second left, page 10: 10 pages left (density 200/s); 100 read over
    a second, 0.5 s left: 5 pages."""
    assert slices.remaining(Slice(at(0), at(1), (at(0.5), 1), read=100), at(9), 10) == 10.0
    assert slices.remaining(Slice(at(0), at(1.5), (at(1), 1), read=100), at(9), 10) == 5.0


def test_split_point_edges() -> None:
    """Exactly MIN_SPLIT_PAGES left: not split; a middle exactly MIN_SPLIT_SPAN away: split; a bounded slice is split
    in the middle of what is left of its own range, not of the walk's."""
    assert slices.split_point(Slice(at(0), at(20), (at(10), 1), read=15), at(100), 10) is None  # 1.5 pages
    dense = Slice(at(0), at(4), (at(0), 7), read=100)
    assert slices.split_point(dense, at(100), 10) == at(2)
    bounded = Slice(at(0), at(40), (at(10), 1), read=100)
    assert slices.split_point(bounded, at(100), 10) == at(25)


def test_split_of_a_bounded_slice_gives_the_new_one_its_old_end() -> None:
    every = [Slice(at(0), at(40), (at(10), 1), read=100), Slice(at(40), None, (at(40), 0))]
    taken = slices.split(every, every[0], at(25))
    assert (every[0].until, taken.start, taken.until) == (at(25), at(25), at(40))


def test_best_split_prefers_the_slice_with_most_left_among_splittable_ones() -> None:
    lighter = Slice(at(0), at(50), (at(10), 1), read=10)  # 4 pages left
    heavier = Slice(at(50), None, (at(60), 1), read=100)  # 40 pages left
    assert slices.best_split([lighter, heavier], at(100), 10) == (heavier, at(80))
    assert slices.best_split([heavier, lighter], at(100), 10) == (heavier, at(80))
