"""The tracez aggregator: running, errored and finished spans by name and latency.

Sans-I/O and synchronous, fed from the event loop thread that serves requests:

* ``TracezAggregator.started`` registers a request as running (called as its
  record is made): it is the registry's own ``set.add``, so a request's start
  pays one C call. :meth:`~TracezAggregator.on_request_end` (it is a
  :class:`~zerver.trace.Subscriber`) takes it out again and appends the finished
  record to a pending batch: the one Python call tracez adds to a request. A
  cancelled request ends there too (the app notifies subscribers in a
  ``finally``), so the running registry never leaks. Its bound
  (``max_running``) is kept there and when a page reads it.
* The pending batch is folded into the counts by the request that fills it
  (``fold_every`` records), or when a page asks (:meth:`~TracezAggregator.summary`
  and friends). By default every request folds its own record as it ends, so a
  record not kept as a sample dies with its request: held in a batch it would
  outlive a collection or two of the youngest generation, move up, and make the
  collector's full passes (which walk the whole heap) come sooner. Measured,
  that costs more than folding one record at a time saves.
* Folding names each request's spans as the trace engine would (the server
  span, one per job) and keeps, per name: the error count, a count per
  latency bucket, and the last few records per bucket and per error. Samples
  are records, not spans: a page builds the span tree when it shows one.
* A bucket (and the error list) takes a new sample at most once per
  ``sample_interval_ns`` of record time (10 ms; the OpenCensus zPages keep one
  a second). A person clicking through an app is far slower, so every request
  they make is kept; under load most records are not, and die with their
  request instead of living on into the garbage collector's old generation,
  whose full passes would otherwise cost every request.
* Every store is bounded; what a bound turns away is counted in
  :attr:`~TracezAggregator.evicted`.

The nine latency buckets are those of the OpenCensus zPages tracez page:
``[0, 10µs) [10µs, 100µs) [100µs, 1ms) [1ms, 10ms) [10ms, 100ms) [100ms, 1s)
[1s, 10s) [10s, 100s) [100s, ∞)``; a duration exactly on an edge belongs to the
bucket that edge opens.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from zerver.trace._records import CANCEL, COMPLETE, JobState, RequestRecord

__all__ = [
    "BUCKET_LABELS",
    "BUCKET_LOWER_NS",
    "NameSummary",
    "Sample",
    "TracezAggregator",
    "latency_bucket",
    "span_names",
]

#: The lower edge of each latency bucket, in nanoseconds.
BUCKET_LOWER_NS: tuple[int, ...] = (0, *(10**e for e in range(4, 12)))
_UPPER = BUCKET_LOWER_NS[1:]
BUCKET_LABELS: tuple[str, ...] = (
    "[0, 10µs)",
    "[10µs, 100µs)",
    "[100µs, 1ms)",
    "[1ms, 10ms)",
    "[10ms, 100ms)",
    "[100ms, 1s)",
    "[1s, 10s)",
    "[10s, 100s)",
    "[100s, ∞)",
)


def latency_bucket(duration_ns: int) -> int:
    """The index (0-8) of the bucket ``duration_ns`` falls in."""
    return bisect_right(_UPPER, duration_ns)


class Sample:
    """One span of a kept request: the record, which span of it, and its facts."""

    __slots__ = ("duration_ns", "error", "job_index", "name", "record")

    def __init__(
        self,
        record: RequestRecord,
        name: str,
        job_index: int | None,
        duration_ns: int,
        error: bool,
    ) -> None:
        self.record = record
        self.name = name
        self.job_index = job_index  # None: the request's root span
        self.duration_ns = duration_ns
        self.error = error


def _start_ts(rec: RequestRecord) -> int:
    return rec.start_ts


def root_name(rec: RequestRecord) -> str:
    """The root span's name, as the trace engine gives it."""
    if rec.kind == "consumer":
        return f"queue.process {rec.route or ''}"
    return f"http.server: {rec.method} {rec.route}" if rec.route else f"http.server: {rec.method}"


def _root_error(rec: RequestRecord) -> bool:
    if rec.kind == "consumer":
        return rec.system_fault or rec.status >= 400
    return rec.system_fault or rec.status >= 500


_NOT_ERROR = (COMPLETE, CANCEL)


def _job_error(job: JobState) -> bool:
    """Whether the job's span is ERROR (the trace engine's rule)."""
    outcome = job.outcome
    if outcome is None:
        return True
    if outcome in _NOT_ERROR:
        return False
    return job.required


def span_names(rec: RequestRecord) -> Iterator[Sample]:
    """The spans tracez counts for a finished record: the root, then one per job."""
    end = rec.end_ts if rec.end_ts is not None else rec.start_ts
    yield Sample(rec, root_name(rec), None, end - rec.start_ts, _root_error(rec))
    for job in rec.jobs:
        start = job.enqueue_ts if job.enqueue_ts is not None else end
        stop = job.end_ts if job.end_ts is not None else end
        yield Sample(rec, job.name, job.index, stop - start, _job_error(job))


@dataclass(frozen=True, slots=True, kw_only=True)
class NameSummary:
    """One row of the summary: a span name's counts."""

    name: str
    running: int
    errors: int
    latency: tuple[int, ...]


_NEVER = -(1 << 62)

#: A kept span: its request's record and the job's index (None: the root span).
_Kept = tuple[RequestRecord, int | None]


def _sample(kept: _Kept) -> Sample:
    rec, index = kept
    end = rec.end_ts if rec.end_ts is not None else rec.start_ts
    if index is None:
        return Sample(rec, root_name(rec), None, end - rec.start_ts, _root_error(rec))
    job = rec.jobs[index]
    start = job.enqueue_ts if job.enqueue_ts is not None else end
    stop = job.end_ts if job.end_ts is not None else end
    return Sample(rec, job.name, index, stop - start, _job_error(job))


class _Name:
    """What the aggregator keeps for one span name."""

    __slots__ = ("counts", "error_samples", "errors", "last_error", "last_kept", "samples")

    def __init__(self, per_bucket: int, per_error: int) -> None:
        self.counts = [0] * len(BUCKET_LOWER_NS)
        self.errors = 0
        # When (record time) each bucket, and the error list, last took a sample.
        self.last_kept = [_NEVER] * len(BUCKET_LOWER_NS)
        self.last_error = _NEVER
        self.samples = tuple(deque[_Kept](maxlen=per_bucket) for _ in BUCKET_LOWER_NS)
        self.error_samples = deque[_Kept](maxlen=per_error)


class TracezAggregator:
    """Counts finished spans per name and latency bucket; registers running requests.

    ``samples_per_bucket``, ``error_samples`` and ``running_samples`` bound the
    records kept per name; ``max_names`` the names tracked (later names are
    counted in ``evicted["names"]``); ``max_running`` the running registry (kept
    when requests end and pages read; a request taken out still counts when it ends);
    ``fold_every`` the pending batch; ``sample_interval_ns`` how often (in record
    time) a bucket or the error list may take a new sample.
    """

    def __init__(
        self,
        *,
        samples_per_bucket: int = 8,
        error_samples: int = 16,
        running_samples: int = 16,
        max_names: int = 256,
        max_running: int = 4096,
        fold_every: int = 1,
        sample_interval_ns: int = 10_000_000,
    ) -> None:
        self.samples_per_bucket = samples_per_bucket
        self.error_samples = error_samples
        self.running_samples = running_samples
        self.max_names = max_names
        self.max_running = max_running
        self.fold_every = fold_every
        self.sample_interval_ns = sample_interval_ns
        # The registry of requests in flight. Registering is ``set.add`` itself, called
        # without a Python frame; the bound is kept when requests end and pages read.
        self._running: set[RequestRecord] = set()
        self.started: Callable[[RequestRecord], None] = self._running.add
        """``record``'s request is running (until :meth:`on_request_end`)."""
        self._pending: list[RequestRecord] = []
        self._names: dict[str, _Name] = {}
        # Root entries by the record's (kind, method, route): found without the name.
        self._roots: dict[tuple[str, str, str | None], _Name] = {}
        #: Requests folded in so far.
        self.requests = 0
        #: What the bounds turned away: ``samples`` (latency samples replaced by newer
        #: ones), ``error_samples``, ``names`` (spans of names past ``max_names``) and
        #: ``running`` (requests taken out of the running registry to keep it within
        #: ``max_running``: they still count once they end) and
        #: ``interval`` (spans not kept as a latency sample: their bucket took one less
        #: than ``sample_interval_ns`` before).
        self.evicted = {"samples": 0, "error_samples": 0, "names": 0, "running": 0, "interval": 0}

    # -- the request path -------------------------------------------------------------

    def on_request_end(self, record: RequestRecord) -> None:
        running = self._running
        running.discard(record)
        if len(running) > self.max_running:
            self._bound_running()
        pending = self._pending
        pending.append(record)
        if len(pending) >= self.fold_every:
            self.fold()

    def _bound_running(self) -> None:
        """Take requests out of the running registry until ``max_running`` are left."""
        running = self._running
        while len(running) > self.max_running:
            running.pop()
            self.evicted["running"] += 1

    # -- pages --------------------------------------------------------------------------

    def fold(self) -> None:
        """Count the pending records (pages call this before reading).

        It runs for every request, so it is written for speed: locals only, the root
        span's entry found by the record's (kind, method, route) without building its
        name, and the counting of a span written out for the root and for the jobs
        rather than called (``span_names`` says the same in a form meant for reading).
        """
        pending, self._pending = self._pending, []
        if not pending:
            return
        self.requests += len(pending)
        names = self._names
        roots = self._roots
        interval = self.sample_interval_ns
        evicted = self.evicted
        skipped = 0
        for rec in pending:
            start = rec.start_ts
            end = rec.end_ts
            if end is None:
                end = start
            entry = roots.get((rec.kind, rec.method, rec.route))
            if entry is None:
                entry = self._root_entry(rec)
            if entry is not None:
                bucket = bisect_right(_UPPER, end - start)
                entry.counts[bucket] += 1
                if end - entry.last_kept[bucket] >= interval:
                    entry.last_kept[bucket] = end
                    kept = entry.samples[bucket]
                    if len(kept) == kept.maxlen:
                        evicted["samples"] += 1
                    kept.append((rec, None))
                else:
                    skipped += 1
                if rec.system_fault or rec.status >= (400 if rec.kind == "consumer" else 500):
                    entry.errors += 1
                    if end - entry.last_error >= interval:
                        entry.last_error = end
                        errors = entry.error_samples
                        if len(errors) == errors.maxlen:
                            evicted["error_samples"] += 1
                        errors.append((rec, None))
            for job in rec.jobs:
                name = job.name
                entry = names.get(name)
                if entry is None:
                    entry = self._new_name(name)
                    if entry is None:
                        continue
                job_start = job.enqueue_ts
                job_end = job.end_ts
                if job_end is None:
                    job_end = end
                bucket = bisect_right(_UPPER, job_end - (end if job_start is None else job_start))
                entry.counts[bucket] += 1
                if end - entry.last_kept[bucket] >= interval:
                    entry.last_kept[bucket] = end
                    kept = entry.samples[bucket]
                    if len(kept) == kept.maxlen:
                        evicted["samples"] += 1
                    kept.append((rec, job.index))
                else:
                    skipped += 1
                outcome = job.outcome
                if outcome is None or (outcome not in _NOT_ERROR and job.required):
                    entry.errors += 1
                    if end - entry.last_error >= interval:
                        entry.last_error = end
                        errors = entry.error_samples
                        if len(errors) == errors.maxlen:
                            evicted["error_samples"] += 1
                        errors.append((rec, job.index))
        evicted["interval"] += skipped

    def _root_entry(self, rec: RequestRecord) -> _Name | None:
        """The entry of ``rec``'s root span, remembered by (kind, method, route)."""
        name = root_name(rec)
        entry = self._names.get(name)
        if entry is None:
            entry = self._new_name(name)
            if entry is None:
                return None
        if len(self._roots) < self.max_names:
            self._roots[(rec.kind, rec.method, rec.route)] = entry
        return entry

    def _new_name(self, name: str) -> _Name | None:
        """A new name's entry, or None (counted) when ``max_names`` are tracked."""
        if len(self._names) >= self.max_names:
            self.evicted["names"] += 1
            return None
        entry = self._names[name] = _Name(self.samples_per_bucket, self.error_samples)
        return entry

    def running_samples_by_name(self) -> dict[str, list[Sample]]:
        """Every running span by name (the root, and each job started and not ended),
        derived from the running records now."""
        self._bound_running()
        out: dict[str, list[Sample]] = {}
        for rec in sorted(self._running, key=_start_ts):
            now = rec.clock.now_ns()
            out.setdefault(root_name(rec), []).append(
                Sample(rec, root_name(rec), None, now - rec.start_ts, False)
            )
            for job in list(rec.jobs):
                if job.enqueue_ts is not None and job.end_ts is None:
                    out.setdefault(job.name, []).append(
                        Sample(rec, job.name, job.index, now - job.enqueue_ts, False)
                    )
        return out

    @property
    def running(self) -> int:
        """Requests running now (registered ones)."""
        self._bound_running()
        return len(self._running)

    def summary(self) -> list[NameSummary]:
        """One row per span name (finished or running), sorted by name."""
        self.fold()
        running = self.running_samples_by_name()
        rows = []
        for name in sorted({*self._names, *running}):
            entry = self._names.get(name)
            rows.append(
                NameSummary(
                    name=name,
                    running=len(running.get(name, ())),
                    errors=entry.errors if entry else 0,
                    latency=tuple(entry.counts) if entry else (0,) * len(BUCKET_LOWER_NS),
                )
            )
        return rows

    def samples(self, name: str, kind: str, bucket: int | None = None) -> list[Sample]:
        """The kept samples of ``name``, newest first: ``kind`` is ``latency`` (with a
        ``bucket`` 0-8), ``error`` or ``running``."""
        self.fold()
        if kind == "running":
            return self.running_samples_by_name().get(name, [])[: self.running_samples]
        entry = self._names.get(name)
        if entry is None:
            return []
        if kind == "error":
            return [_sample(k) for k in reversed(entry.error_samples)]
        if kind == "latency" and bucket is not None and 0 <= bucket < len(BUCKET_LOWER_NS):
            return [_sample(k) for k in reversed(entry.samples[bucket])]
        return []

    def find_trace(self, trace_id: int) -> RequestRecord | None:
        """A kept or running record of ``trace_id`` (the newest if several)."""
        self.fold()
        for entry in self._names.values():
            for kept in (entry.error_samples, *entry.samples):
                for rec, _job in reversed(kept):
                    if rec.trace_id == trace_id:
                        return rec
        for rec in list(self._running):
            if rec.trace_id == trace_id:
                return rec
        return None
