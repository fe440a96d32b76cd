"""The reactor job system: bounded queues, worker pools and the job lifecycle.

Rules of the lifecycle (the job system, never user code, writes them):

* ``ENQUEUE``: :meth:`JobQueue.enqueue` stamps ``enqueue_ts`` and the queue
  depth. A full queue refuses the job at once with :class:`QueueFullError`
  (a 429-class effect failure): a request never hangs on a queue.
* ``TAKE``: a worker receives the job and stamps ``take_ts``, its index and
  the depth left behind.
* ``START``: the job's work begins (``start_ts``). Between take and start
  the worker only sets up the attempt, so ``dispatch_ms`` stays tiny.
* ``PARK``/``RESUME``: recorded by park points (:mod:`zerver.runtime._park`) while the
  job runs: limiters, rate limiters, retry back-off, awaited I/O.
* ``COMPLETE | FAIL | CANCEL``: ``end_ts`` and ``outcome`` are written exactly
  once by :meth:`Job.finish`. A job cancelled while queued is never started.
  After ``finish`` nothing writes to the job's state again, even when a
  cancelled worker unwinds later.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from opentelemetry import context as otel_context

from zerver.core._errors import EffectError, QueueFullError
from zerver.trace._propagation import attach_span
from zerver.trace._records import (
    CANCEL,
    COMPLETE,
    FAIL,
    JobState,
    Outcome,
    RequestRecord,
    RetryRecord,
    active_span,
    exception_facts,
)

from ._park import JobContext, Wakeup, wakeup_factory

if TYPE_CHECKING:
    from zerver.core._clock import Clock
    from zerver.core._effects import Effect

    from ._park import Interpreter

__all__ = ["Job", "JobQueue", "JobSystem"]


class Stoppable(Protocol):
    """What stops a running attempt or back-off early: an anyio cancel scope, or
    :class:`_TimeoutStopper` on asyncio."""

    def cancel(self) -> None: ...


class _TimeoutStopper:
    """Stops an attempt running under ``asyncio.timeout_at``: the timeout fires now."""

    __slots__ = ("_loop", "_timeout")

    def __init__(self, timeout: asyncio.Timeout, loop: asyncio.AbstractEventLoop) -> None:
        self._timeout = timeout
        self._loop = loop

    def cancel(self) -> None:
        with contextlib.suppress(RuntimeError):  # it already ended
            self._timeout.reschedule(self._loop.time())


class _Deadlines:
    """Attempt timeouts on asyncio with one loop timer per timeout length, not one
    per attempt.

    Attempts with the same timeout start in the order of their deadlines (each is
    the loop's monotonic time plus that timeout), so each length keeps a *lane*: a
    FIFO of ``[deadline, timeout, live]`` entries, and one timer for its oldest
    live entry. An attempt that ends marks its entry dead; dead entries leave from
    the front as new ones arrive or the timer fires (and, behind a live one that
    runs long, in a sweep whenever the lane has doubled since the last, so a
    lane holds about twice its attempts in flight), and the timer fires a
    still-live entry's ``asyncio.Timeout`` at its deadline (the timeout then
    cancels its task on the loop's next turn, as its own timer would have).
    Arming a timer per attempt (a ``TimerHandle`` pushed on the loop's heap, whose
    ordering is Python code, and cancelled again almost always) was ~3 % of a
    blog request under load. At most ``MAX_LANES`` lengths get a lane; an attempt
    beyond that, or one that would not keep its lane in order, arms its own timer.
    """

    MAX_LANES = 64

    __slots__ = ("_lanes", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lanes: dict[float, _Lane] = {}

    def watch(self, length: float, deadline: float, timeout: asyncio.Timeout) -> list[Any] | None:
        """Fire ``timeout`` (entered, without a deadline of its own) at ``deadline``
        unless its entry is marked dead first (``entry[2] = False``). ``None`` when
        it has no lane: then it arms its own timer."""
        lane = self._lanes.get(length)
        if lane is None:
            if len(self._lanes) >= self.MAX_LANES:
                timeout.reschedule(deadline)
                return None
            lane = self._lanes[length] = _Lane()
        entries = lane.entries
        while entries and not entries[0][2]:
            entries.popleft()
        if entries and entries[-1][0] > deadline:
            timeout.reschedule(deadline)
            return None
        entry = [deadline, timeout, True]
        entries.append(entry)
        if len(entries) > lane.sweep_at:
            live = deque(e for e in entries if e[2])
            lane.entries = live
            lane.sweep_at = max(_Lane.SWEEP_MIN, 2 * len(live))
        if lane.handle is None:
            lane.handle = self.loop.call_at(deadline, self._fire, lane)
        return entry

    def _fire(self, lane: _Lane) -> None:
        lane.handle = None
        now = self.loop.time()
        entries = lane.entries
        while entries:
            deadline, timeout, live = entries[0]
            if live and deadline > now:
                lane.handle = self.loop.call_at(deadline, self._fire, lane)
                return
            entries.popleft()
            if live:
                with contextlib.suppress(RuntimeError):  # it ended meanwhile
                    timeout.reschedule(now)

    def close(self) -> None:
        for lane in self._lanes.values():
            if lane.handle is not None:
                lane.handle.cancel()
        self._lanes.clear()


class _Lane:
    SWEEP_MIN = 1024

    __slots__ = ("entries", "handle", "sweep_at")

    def __init__(self) -> None:
        self.entries: deque[list[Any]] = deque()
        self.handle: asyncio.TimerHandle | None = None
        # Sweep out dead entries once the lane holds more than this.
        self.sweep_at = self.SWEEP_MIN


class _ScopeTimeout:
    """``asyncio.timeout_at`` on any anyio backend: an anyio cancel scope with the
    deadline, raising ``TimeoutError`` when it fired; :meth:`cancel` fires it now."""

    __slots__ = ("_scope",)

    def __init__(self, deadline: float) -> None:
        self._scope = anyio.CancelScope(deadline=deadline)

    def cancel(self) -> None:
        self._scope.cancel()

    async def __aenter__(self) -> _ScopeTimeout:
        self._scope.__enter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        swallowed = bool(self._scope.__exit__(exc_type, exc, tb))
        if self._scope.cancelled_caught:
            raise TimeoutError
        return swallowed


class Job:
    """A unit of work on a queue: its recorded state plus what to run.

    ``work`` is an async callable run by the worker; ``on_done`` is called
    once, synchronously, when the job finishes in any way (the job lets go of
    both then).
    """

    __slots__ = ("clock", "on_done", "request", "result", "scope", "state", "work")

    def __init__(
        self,
        state: JobState,
        clock: Clock,
        work: Callable[[Job], Any],
        on_done: Callable[[Job], None],
        request: RequestRecord,
    ) -> None:
        self.state = state
        self.clock = clock
        self.request = request
        self.work = work
        self.on_done = on_done
        self.result: Any = None
        self.scope: Stoppable | None = None

    @property
    def finished(self) -> bool:
        return self.state.outcome is not None

    def finish(
        self,
        outcome: Outcome,
        *,
        error_type: str | None = None,
        error_message: str | None = None,
        status_hint: int | None = None,
    ) -> None:
        """Record the end of the job (once) and tell whoever waits for it."""
        st = self.state
        if st.outcome is not None:
            return
        end = st.end_ts = self.clock.now_ns()
        st.outcome = outcome
        st.success = outcome == COMPLETE
        if st.park_episodes and outcome != COMPLETE:
            # A job cancelled or failed while parked: the wait ends with the job, and
            # its park point, unwinding later, writes nothing (see _park._Parked).
            for ep in st.park_episodes:
                if ep.resume_ts is None:
                    ep.resume_ts = end
        if error_type is not None:
            st.error_type = error_type
            st.error_message = error_message
            st.status_hint = status_hint
        on_done = self.on_done
        # A finished job needs neither callable again. Both are often methods of
        # whoever holds the job (a Need's run keeps its jobs): forgetting them here
        # leaves no reference cycle per request for the cyclic collector, whose full
        # collections stalled the loop for 100 ms and more under load.
        self.on_done = self.work = _finished_already
        on_done(self)

    def cancel(self, reason: str = "cancelled") -> None:
        """Cancel the job: record CANCEL now, and stop its work if it is running."""
        if self.state.outcome is not None:
            return
        if self.scope is not None:
            self.scope.cancel()
        self.finish(CANCEL, error_type="cancelled", error_message=reason)


def _finished_already(job: Job) -> None:
    """What a finished job's ``work`` and ``on_done`` become (see :meth:`Job.finish`)."""


class JobQueue:
    """A bounded FIFO queue with its pool of workers.

    Hand-written rather than an anyio memory stream: a stream's ``receive``
    yields to the loop once even when an item is waiting, which costs a full
    loop iteration per hop, and the runtime makes three hops per request.
    Idle workers wait on one event each and are woken last-in first-out, so
    the same few warm workers do most of the work.

    :meth:`take_now` lets the caller's own task run a job on behalf of an idle
    worker: the job is enqueued and taken at once (both stamped, with that
    worker's index), the worker stays asleep and is held until
    :meth:`give_back`. It applies only when nothing waits in the queue and a
    worker idles, so it skips a task switch, never a wait.
    """

    __slots__ = (
        "_closed",
        "_idle",
        "_items",
        "_wakeup",
        "_woken",
        "capacity",
        "clock",
        "name",
        "workers",
    )

    def __init__(self, name: str, capacity: int, workers: int, clock: Clock) -> None:
        if capacity < 1 or workers < 1:
            raise ValueError(f"queue {name!r} needs capacity >= 1 and workers >= 1")
        self.name = name
        self.capacity = capacity
        self.workers = workers
        self.clock = clock
        self._items: deque[Job] = deque()
        self._idle: list[tuple[int, Wakeup]] = []
        self._wakeup: Callable[[], Wakeup] = anyio.Event  # chosen for the loop in start()
        # Jobs already promised to a woken worker do not count against capacity.
        self._woken = 0
        self._closed = False

    @property
    def depth(self) -> int:
        """Jobs waiting to be taken."""
        return len(self._items)

    def enqueue(self, job: Job) -> None:
        """Put the job on the queue or raise :class:`QueueFullError` at once."""
        st = job.state
        items = self._items
        st.enqueue_ts = self.clock.now_ns()
        st.depth_enqueue = len(items)
        if len(items) - self._woken >= self.capacity:
            raise QueueFullError(self.name, self.capacity)
        if self._closed:
            raise EffectError(
                f"queue {self.name!r} is shut down", kind="queue_closed", status_hint=503
            )
        items.append(job)
        if self._idle:
            self._woken += 1
            self._idle.pop()[1].set()

    def take_now(self, job: Job) -> tuple[int, Wakeup] | None:
        """Enqueue ``job`` and take it at once for the caller to run, on behalf of an
        idle worker (returned, to :meth:`give_back` once the job finished); None when
        no worker idles or a queued job has no worker woken for it yet, which this
        one must not overtake (then nothing is recorded: use :meth:`enqueue`)."""
        if not self._idle or len(self._items) > self._woken or self._closed:
            return None
        worker = self._idle.pop()
        st = job.state
        st.enqueue_ts = st.take_ts = self.clock.now_ns()
        # Jobs on the queue now each have a worker woken for them (checked above).
        st.depth_enqueue = st.depth_take = len(self._items)
        st.worker = worker[0]
        return worker

    def hand_over(self, job: Job, worker: tuple[int, Wakeup]) -> None:
        """Give a job :meth:`take_now` took back to the workers after all: it goes to
        the head of the queue and its worker is woken. The worker that takes it
        records its take again (the job did wait that long)."""
        self._items.appendleft(job)
        self._woken += 1
        worker[1].set()

    def give_back(self, worker: tuple[int, Wakeup]) -> None:
        """Return a worker :meth:`take_now` held: idle again, or woken if jobs wait."""
        if self._items or self._closed:
            self._woken += 1
            worker[1].set()
        else:
            self._idle.append(worker)

    async def _worker(self, index: int) -> None:
        now = self.clock.now_ns
        items = self._items
        idle = self._idle
        wakeup = self._wakeup
        while True:
            if not items:
                if self._closed:
                    return
                ev = wakeup()
                idle.append((index, ev))
                try:
                    await ev.wait()
                finally:
                    if ev.is_set() and self._woken:
                        self._woken -= 1
                continue
            job = items.popleft()
            st = job.state
            if st.outcome is not None:  # cancelled while queued
                continue
            st.take_ts = now()
            st.worker = index
            st.depth_take = len(items)
            try:
                await job.work(job)
            except Exception as exc:  # a broken job must not kill the worker
                job.finish(
                    FAIL,
                    error_type=type(exc).__name__,
                    error_message=str(exc),
                    status_hint=500,
                )

    def idle_workers(self) -> int:
        """Workers waiting for a job right now."""
        return len(self._idle)

    def start(self, tg: TaskGroup) -> None:
        self._wakeup = wakeup_factory()
        for i in range(self.workers):
            tg.start_soon(self._worker, i, name=f"zerver-{self.name}-{i}")

    def close(self) -> None:
        """Stop intake; workers finish what is queued and exit."""
        self._closed = True
        idle, self._idle = self._idle, []
        self._woken += len(idle)
        for _, ev in idle:
            ev.set()


class JobSystem:
    """The effects and continuations queues, and how an effect job runs."""

    def __init__(
        self,
        clock: Clock,
        interpreters: dict[str, Interpreter],
        *,
        effects_queue: str = "effects",
        cont_queue: str = "continuations",
        effects_capacity: int = 1024,
        effects_workers: int = 64,
        cont_capacity: int = 1024,
        cont_workers: int = 4,
        rng: random.Random | None = None,
    ) -> None:
        self.clock = clock
        # Retry jitter comes from here, so a seeded app retries reproducibly.
        self.rng = rng if rng is not None else random.Random()
        self.interpreters = interpreters
        self.effects = JobQueue(effects_queue, effects_capacity, effects_workers, clock)
        self.continuations = JobQueue(cont_queue, cont_capacity, cont_workers, clock)
        self._tg: TaskGroup | None = None
        # On asyncio: the loop, whose clock and native timeouts the attempts use,
        # and the lanes that fire those timeouts.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadlines: _Deadlines | None = None
        # Systems whose interpreter answers without waiting (``synchronous = True``).
        self.synchronous = frozenset(
            name for name, interp in interpreters.items() if getattr(interp, "synchronous", False)
        )
        # Systems whose interpreter makes no OpenTelemetry spans: no context to attach.
        self._no_otel = frozenset(
            name
            for name, interp in interpreters.items()
            if getattr(interp, "otel_spans", True) is False
        )

    async def yield_turn(self) -> None:
        """Let every other ready task run once before going on. On asyncio a bare
        ``sleep(0)`` (itself a cancellation point there): anyio's ``checkpoint``
        costs about twice as much."""
        if self._loop is not None:
            await asyncio.sleep(0)
        else:
            await anyio.lowlevel.checkpoint()

    async def __aenter__(self) -> JobSystem:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        else:
            self._deadlines = _Deadlines(self._loop)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self.effects.start(self._tg)
        self.continuations.start(self._tg)
        # Let the workers reach their queues before the first job arrives
        # (bounded: a worker needs a couple of scheduling rounds to get there).
        for _ in range(16):
            if self.effects.idle_workers() == self.effects.workers and (
                self.continuations.idle_workers() == self.continuations.workers
            ):
                break
            await anyio.lowlevel.checkpoint()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.effects.close()
        self.continuations.close()
        assert self._tg is not None
        try:
            await self._tg.__aexit__(*exc_info)
        finally:
            if self._deadlines is not None:
                self._deadlines.close()
                self._deadlines = None
        self._tg = None

    def interpreter_for(self, effect: Effect) -> Interpreter:
        interp = self.interpreters.get(effect.system)
        if interp is None:
            raise EffectError(
                f"no interpreter registered for effect system {effect.system!r} "
                f"(effect {effect.span_name!r}); register one with app.interpreter()",
                kind="no_interpreter",
                status_hint=500,
            )
        return interp

    async def run_effect(self, job: Job) -> None:
        """Run an effect job: attempts with timeout, retries with back-off."""
        st = job.state
        effect = st.effect
        assert effect is not None
        clock = self.clock
        request = job.request
        ctx = JobContext(st, clock, request)
        st.start_ts = clock.now_ns()
        try:
            interp = self.interpreter_for(effect)
        except EffectError as exc:
            job.finish(FAIL, error_type=exc.kind, error_message=str(exc), status_hint=500)
            return
        # Spans an interpreter makes through the OpenTelemetry API nest under the effect.
        token = (
            attach_span(request, st.span_id)
            if request.otel_context and effect.system not in self._no_otel
            else None
        )
        active = active_span.set((request, st.span_id))
        try:
            await self._attempts(job, ctx, interp, effect)
        finally:
            active_span.reset(active)
            if token is not None:
                otel_context.detach(token)

    async def _rest_of_attempt(
        self, job: Job, length: float, deadline: float, attempt: Awaitable[Any]
    ) -> tuple[bool, EffectError | None, Exception | None]:
        """Await the attempt under its timeout (``length`` seconds, ending at
        ``deadline``): (timed out?, its error if it failed, what the interpreter
        raised).

        On asyncio the timeout is the loop's own (``asyncio.Timeout``), fired by
        the lane of attempts with the same length (:class:`_Deadlines`): an anyio
        cancel scope per attempt cost about a tenth of a database request's
        dispatch (it looks up the backend, the host task and its scope stack, and
        arms a timer), where the native timeout does none of that. anyio
        propagates a native cancellation through its own scopes inside the
        interpreter; a cancellation from anyio (shutdown) passes through this one.
        Elsewhere an anyio cancel scope behaves the same (:class:`_ScopeTimeout`).
        """
        deadlines = self._deadlines  # set on asyncio only
        native: asyncio.Timeout | None = None
        timeout: asyncio.Timeout | _ScopeTimeout
        if deadlines is None:
            timeout = job.scope = _ScopeTimeout(deadline)
        else:
            timeout = native = asyncio.timeout(None)
            job.scope = _TimeoutStopper(native, deadlines.loop)
        error: EffectError | None = None
        raised: Exception | None = None
        entry: list[Any] | None = None
        try:
            async with timeout:
                if native is not None and deadlines is not None:
                    entry = deadlines.watch(length, deadline, native)
                try:
                    job.result = await attempt
                except EffectError as exc:
                    error = raised = exc
                except Exception as exc:
                    error = _unexpected(exc)
                    raised = exc
        except TimeoutError:
            return True, None, None
        finally:
            job.scope = None
            if entry is not None:
                entry[2] = False
        return False, error, raised

    async def _attempts(
        self, job: Job, ctx: JobContext, interp: Interpreter, effect: Effect
    ) -> None:
        st = job.state
        clock = self.clock
        policy = effect.retry
        timeout_s = effect.timeout_ms / 1000.0
        loop = self._loop
        while True:
            st.attempts += 1
            deadline = (loop.time() if loop is not None else anyio.current_time()) + timeout_s
            error: EffectError | None = None
            raised: Exception | None = None
            timed_out = False
            if effect.system in self.synchronous:
                # It answers without waiting (it says so): no cancel scope, no timer.
                # Should it wait after all, the rest runs under the timeout as usual.
                attempt = interp.perform(effect, ctx)
                try:
                    waiting_on = attempt.send(None)
                except StopIteration as done:
                    job.result = done.value
                except EffectError as exc:
                    error = raised = exc
                except Exception as exc:
                    error = _unexpected(exc)
                    raised = exc
                else:
                    timed_out, error, raised = await self._rest_of_attempt(
                        job, timeout_s, deadline, Resumed(attempt, waiting_on)
                    )
            else:
                timed_out, error, raised = await self._rest_of_attempt(
                    job, timeout_s, deadline, interp.perform(effect, ctx)
                )
            if job.finished:  # cancelled from outside while running
                return
            if raised is not None:  # the span of the effect records what was raised
                facts = exception_facts(raised, clock.now_ns())
                if st.exceptions is None:
                    st.exceptions = [facts]
                else:
                    st.exceptions.append(facts)
            if error is None and timed_out:
                error = EffectError(
                    f"{effect.span_name} timed out after {effect.timeout_ms} ms",
                    kind="timeout",
                    status_hint=504,
                    retryable=True,
                )
            if error is None:
                job.finish(COMPLETE)
                return
            if error.retryable and st.attempts < policy.max_attempts:
                backoff_ms = policy.backoff_for(st.attempts, self.rng)
                st.retries.append(RetryRecord(clock.now_ns(), st.attempts, error.kind, backoff_ms))
                with anyio.CancelScope() as backoff_scope, ctx.parked("timer", "retry_backoff"):
                    job.scope = backoff_scope
                    await clock.sleep(backoff_ms / 1000.0)
                job.scope = None
                if job.finished:
                    return
                continue
            job.finish(
                FAIL, error_type=error.kind, error_message=str(error), status_hint=error.status_hint
            )
            return


def _unexpected(exc: Exception) -> EffectError:
    return EffectError(f"{type(exc).__name__}: {exc}", kind=type(exc).__name__, status_hint=500)


class Resumed:
    """Awaiting this goes on with a coroutine that was started by hand and is waiting
    on ``waiting_on``: what it yields goes to the task, what the task sends or throws
    (a result, a cancellation) goes to it, as if it had been awaited from the start."""

    __slots__ = ("_coro", "_waiting_on")

    def __init__(self, coro: Coroutine[Any, Any, Any], waiting_on: Any) -> None:
        self._coro = coro
        self._waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        yielded = self._waiting_on
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation, thrown in by the task
                try:
                    yielded = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as done:
                    return done.value
