"""Duration maths and promotion, with property tests."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from zerver._specs import Window
from zerver.trace import JobState, ParkEpisode
from zerver.trace._promotion import MIN_SAMPLES, Promoter, RollingPercentile, durations
from zerver.trace._tracing import _lifecycle_events

NS = st.integers(min_value=0, max_value=10_000_000_000)


@st.composite
def lifecycles(draw: st.DrawFn) -> JobState:
    """A job with ordered timestamps; some phases may be missing."""
    enq = draw(NS)
    take = enq + draw(st.integers(0, 50_000_000))
    start = take + draw(st.integers(0, 5_000_000))
    cursor = start
    episodes = []
    for _ in range(draw(st.integers(0, 4))):
        park = cursor + draw(st.integers(0, 10_000_000))
        resume = park + draw(st.integers(0, 20_000_000))
        ep = ParkEpisode(draw(st.sampled_from(["io_wait", "backpressure", "timer"])), park)
        ep.resume_ts = resume
        episodes.append(ep)
        cursor = resume
    end = cursor + draw(st.integers(0, 10_000_000))
    job = JobState(index=0, kind="effect", name="db.get t", queue="effects", step_index=0)
    job.enqueue_ts = enq
    job.take_ts = take if draw(st.booleans()) else None
    job.start_ts = start if job.take_ts is not None and draw(st.booleans()) else None
    job.park_episodes = episodes if job.start_ts is not None else []
    job.end_ts = end
    return job


@given(lifecycles())
def test_durations_are_non_negative_and_add_up(job: JobState) -> None:
    d = durations(job)
    for v in (d.queue_wait_ms, d.dispatch_ms, d.park_wait_ms_total, d.run_active_ms, d.total_ms):
        assert v >= 0
    total = d.queue_wait_ms + d.dispatch_ms + d.park_wait_ms_total + d.run_active_ms
    assert math.isclose(total, d.total_ms, rel_tol=1e-9, abs_tol=1e-9)
    assert d.park_count == len(job.park_episodes)


@given(lifecycles())
def test_missing_phases_count_zero(job: JobState) -> None:
    d = durations(job)
    if job.take_ts is None:  # never taken: all of its time was queueing
        assert d.dispatch_ms == 0 and d.run_active_ms == 0 and d.park_wait_ms_total == 0
        assert d.queue_wait_ms == d.total_ms
    if job.start_ts is None:
        assert d.dispatch_ms == 0 and d.park_wait_ms_total == 0


def test_durations_of_a_known_job() -> None:
    job = JobState(index=0, kind="effect", name="x", queue="effects", step_index=0)
    job.enqueue_ts, job.take_ts, job.start_ts, job.end_ts = 0, 2_000_000, 2_500_000, 20_000_000
    ep = ParkEpisode("io_wait", 3_000_000)
    ep.resume_ts = 13_000_000
    job.park_episodes.append(ep)
    d = durations(job)
    assert (d.queue_wait_ms, d.dispatch_ms, d.park_wait_ms_total, d.run_active_ms, d.total_ms) == (
        2.0,
        0.5,
        10.0,
        7.5,
        20.0,
    )


def test_unfinished_job_uses_fallback_end() -> None:
    job = JobState(index=0, kind="effect", name="x", queue="effects", step_index=0)
    job.enqueue_ts, job.take_ts, job.start_ts = 0, 1_000_000, 1_000_000
    job.park_episodes.append(ParkEpisode("io_wait", 2_000_000))  # never resumed
    d = durations(job, end_fallback=5_000_000)
    assert d.park_wait_ms_total == 3.0 and d.total_ms == 5.0 and d.run_active_ms == 1.0


@given(
    wait=st.floats(0, 100, allow_nan=False),
    queue_ms=st.floats(0, 100, allow_nan=False),
    park_ms=st.floats(0, 100, allow_nan=False),
    debug=st.booleans(),
)
def test_promotion_matches_thresholds(
    wait: float, queue_ms: float, park_ms: float, debug: bool
) -> None:
    p = Promoter(queue_ms=queue_ms, park_ms=park_ms, debug=debug)
    stats = p.stats("/r")  # no samples yet: only the thresholds (or debug) decide
    assert p.promote_queue(stats, wait) == (debug or wait >= queue_ms)
    assert p.promote_park(stats, wait) == (debug or wait >= park_ms)


@given(st.lists(st.floats(0, 1000, allow_nan=False), min_size=MIN_SAMPLES, max_size=300))
def test_rolling_p95_matches_sorted_rank(samples: list[float]) -> None:
    rp = RollingPercentile(Window(count=1000))
    for i, s in enumerate(samples):
        rp.add(i, s)
    rp._recompute(len(samples))
    ordered = sorted(samples)
    assert rp.value == ordered[math.ceil(0.95 * len(ordered)) - 1]


def test_rolling_window_forgets_old_samples() -> None:
    rp = RollingPercentile(Window(seconds=1.0))
    for i in range(40):
        rp.add(i, 100.0)
    assert rp.value == 100.0
    late = 10_000_000_000
    for i in range(40):
        rp.add(late + i, 1.0)
    rp._recompute(late + 40)
    assert rp.value == 1.0


def test_p95_needs_min_samples_and_a_minimum_wait() -> None:
    p = Promoter(queue_ms=1e9, park_ms=1e9, p95_min_ms=0.05)
    stats = p.stats("/r")
    for i in range(MIN_SAMPLES - 1):
        stats.queue.add(i, 0.0)
    assert stats.queue.value == math.inf
    stats.queue.add(99, 0.0)
    assert stats.queue.value == 0.0
    assert not p.promote_queue(stats, 0.0)
    assert p.promote_queue(stats, 0.1)


def test_routes_are_bounded() -> None:
    p = Promoter(max_routes=3)
    for r in "abcde":
        p.stats(r)
    assert len(p._routes) == 3


@given(lifecycles(), st.booleans())
def test_lifecycle_events_are_in_time_order(job: JobState, complete: bool) -> None:
    job.outcome = "complete" if complete else "fail"
    events = _lifecycle_events(job, wall=1_000, end=job.end_ts or 0)
    times = [t for _name, t, _attrs, _dropped in events]
    assert times == sorted(times)
    assert events[-1][0] == ("zerver.job.completed" if complete else "zerver.job.failed")


@given(
    wait=st.floats(0, 100, allow_nan=False),
    queue_ms=st.floats(0, 100, allow_nan=False),
    park_ms=st.floats(0, 100, allow_nan=False),
    p95_min=st.floats(0, 10, allow_nan=False),
    p95=st.one_of(st.just(math.inf), st.floats(0, 100, allow_nan=False)),
    debug=st.booleans(),
)
def test_bars_match_the_promotion_rule(
    wait: float, queue_ms: float, park_ms: float, p95_min: float, p95: float, debug: bool
) -> None:
    # The engine compares each wait with one bar; that must be the rule as written:
    # debug, or at least the threshold, or at least both the p95 floor and the p95.
    p = Promoter(queue_ms=queue_ms, park_ms=park_ms, debug=debug, p95_min_ms=p95_min)
    stats = p.stats("/r")
    stats.queue.value = p95
    stats.park.value = p95
    queue_bar, park_bar = p.bars(stats)
    assert (wait >= queue_bar) == (debug or wait >= queue_ms or (wait >= p95_min and wait >= p95))
    assert (wait >= park_bar) == (debug or wait >= park_ms or (wait >= p95_min and wait >= p95))
    assert p.promote_queue(stats, wait) == (wait >= queue_bar)
