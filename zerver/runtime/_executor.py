"""The executor: runs a request's steps, turns ``Need`` into jobs and joins them.

Steps run synchronously on the request's task. A ``Need`` creates one effect
job per effect on the effects queue (all at once, or one after another in
sequential mode); a :class:`~zerver.core._join.JoinState` decides when the need is
resolved. On resolution the continuation (``then``) is enqueued directly on
the continuations queue from the finishing worker, so the request task wakes
up once per need, with the continuation's decision in hand.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context

from zerver.core._decisions import Continue, Decision, Done, Fail, Mode, Need
from zerver.core._errors import EffectError, ZerverError
from zerver.core._join import JoinState
from zerver.trace._propagation import attach_span
from zerver.trace._records import (
    COMPLETE,
    FAIL,
    JobState,
    NeedRecord,
    RequestRecord,
    StepRecord,
    active_span,
    exception_facts,
)

from ._jobs import Job, JobSystem, Resumed
from ._park import Wakeup, wakeup_factory

if TYPE_CHECKING:
    from zerver.core._clock import Clock
    from zerver.core._slots import Context
    from zerver.core._steps import Step

__all__ = ["Executor", "PipelineError"]


class PipelineError(ZerverError):
    """The pipeline itself broke: a step raised, a loop ran too deep, no response."""

    def __init__(self, message: str, *, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type


def _record_step(
    record: RequestRecord, step: Step, layer: str, sequence: int, job_index: int | None = None
) -> StepRecord:
    sr = StepRecord(
        index=len(record.steps),
        name=step.name,
        layer=layer,
        sequence=sequence,
        reads=step.reads,
        writes=step.writes,
        start_ts=record.clock.now_ns(),
        job_index=job_index,
    )
    sr.span_id = record.new_span_id()
    record.steps.append(sr)
    return sr


def call_step(
    ctx: Context, record: RequestRecord, step: Step, sr: StepRecord
) -> Decision | PipelineError:
    """Run one step, recording its decision; a raising step becomes a PipelineError."""
    record.current_step = sr.index
    ctx.step_name = step.name
    # Spans made through the OpenTelemetry API inside the step nest under its span.
    token = attach_span(record, sr.span_id) if record.otel_context else None
    active = active_span.set((record, sr.span_id))
    try:
        decision = step.fn(ctx)
    except Exception as exc:
        sr.end_ts = record.clock.now_ns()
        sr.exceptions = [exception_facts(exc, sr.end_ts)]
        sr.error_type = type(exc).__name__
        sr.error_message = str(exc)
        err = PipelineError(
            f"step {step.name!r} raised {type(exc).__name__}: {exc}", error_type=type(exc).__name__
        )
        err.__cause__ = exc
        return err
    finally:
        record.current_step = None
        active_span.reset(active)
        if token is not None:
            otel_context.detach(token)
    sr.end_ts = record.clock.now_ns()
    if isinstance(decision, Need):
        sr.decision = decision.kind
        if decision.then is not None:
            sr.resume = decision.then.name
    elif isinstance(decision, Done):
        sr.decision = decision.kind
        resp = decision.response
        if resp.render_phase is not None:
            sr.render_phase = resp.render_phase
            sr.render_size = len(resp.body)
    elif decision is Continue or isinstance(decision, Fail):
        sr.decision = decision.kind
    else:
        sr.error_type = "InvalidDecision"
        sr.error_message = f"step returned {decision!r}"
        return PipelineError(
            f"step {step.name!r} returned {decision!r}; expected Continue, Done, Fail or Need",
            error_type="InvalidDecision",
        )
    return decision


class _NeedRun:
    """One ``Need`` in flight: its jobs, its join state and its continuation."""

    __slots__ = (
        "cont_job",
        "cont_worker",
        "ctx",
        "done",
        "effects",
        "error",
        "executor",
        "held",
        "held_wait",
        "jobs",
        "join",
        "last_waiting",
        "need",
        "next_effect",
        "outcome",
        "queued",
        "rec",
        "record",
        "sequence",
        "step_index",
    )

    def __init__(
        self,
        executor: Executor,
        ctx: Context,
        record: RequestRecord,
        need: Need,
        rec: NeedRecord,
        step_index: int,
        sequence: int,
    ) -> None:
        self.executor = executor
        self.ctx = ctx
        self.record = record
        self.need = need
        self.rec = rec
        self.step_index = step_index
        self.sequence = sequence
        self.effects = need.effects
        self.join = JoinState(need.join, [e.required for e in need.effects])
        self.jobs: list[Job] = []
        self.next_effect = 0
        self.cont_job: Job | None = None
        self.cont_worker: tuple[int, Wakeup] | None = None
        self.done = executor.wakeup()
        self.outcome: Decision | PipelineError | None = None
        self.error: JobState | None = None
        # Effects of synchronous interpreters taken for an idle worker, for the
        # request's own task to run once every effect of the Need has started.
        self.held: deque[tuple[Job, tuple[int, Wakeup]]] | None = None
        # At most one effect that waits, taken the same way and run by the request's
        # task after the held ones (see `start`).
        self.held_wait: tuple[Job, tuple[int, Wakeup]] | None = None
        # Whether an effect of this Need went on the queue for a worker.
        self.queued = False
        # The index of the effect held to wait, when the Need is parallel (`start`).
        self.last_waiting = -1

    def start(self) -> None:
        if self.need.mode is Mode.PARALLEL:
            self.held = deque()
            # The one effect that waits which the request's task may run itself: the
            # last whose interpreter is not synchronous. Every other effect has been
            # started (on a worker, or held) before the task gets to it, so they still
            # run side by side, and the task would only wait for the Need anyway.
            synchronous = self.executor.jobs.synchronous
            for index in range(len(self.effects) - 1, -1, -1):
                if self.effects[index].system not in synchronous:
                    self.last_waiting = index
                    break
            for _ in range(len(self.effects)):
                if not self._start_next():
                    return
        else:
            self._start_next()

    async def run_held_effects(self) -> None:
        """On the request's task: run the effects held for it (each answers without
        waiting), giving each worker back once its job finished."""
        held = self.held
        assert held is not None
        jobs = self.executor.jobs
        while held:
            job, worker = held.popleft()
            try:
                if not job.finished:  # not cancelled meanwhile
                    running = jobs.run_effect(job)
                    try:
                        waiting_on = running.send(None)
                    except StopIteration:
                        pass
                    else:
                        # It waits after all: the effect held to wait goes to its
                        # worker now, so that the two still run side by side.
                        if self.held_wait is not None:
                            (waiter, its_worker), self.held_wait = self.held_wait, None
                            jobs.effects.hand_over(waiter, its_worker)
                        await Resumed(running, waiting_on)
            finally:
                jobs.effects.give_back(worker)
        if self.held_wait is not None:
            if self.queued:
                # Let the workers woken for the queued effects take them first, as
                # they would have had this effect gone to a worker too.
                await jobs.yield_turn()
            if self.held_wait is None:  # cancelled meanwhile
                return
            (job, worker), self.held_wait = self.held_wait, None
            try:
                if not job.finished:
                    await jobs.run_effect(job)
            finally:
                jobs.effects.give_back(worker)

    def _start_next(self) -> bool:
        """Start the next effect; returns False if the need resolved meanwhile."""
        index = self.next_effect
        effect = self.effects[index]
        self.next_effect = index + 1
        record = self.record
        ex = self.executor
        st = JobState(
            index=len(record.jobs),
            kind="effect",
            name=effect.span_name,
            queue=ex.jobs.effects.name,
            step_index=self.step_index,
            effect=effect,
        )
        st.span_id = record.new_span_id()
        record.jobs.append(st)
        self.rec.jobs.append(st.index)
        job = Job(st, ex.clock, ex.jobs.run_effect, self._effect_done, record)
        self.jobs.append(job)
        held = self.held
        if held is not None:
            # An idle worker: the request's task runs the job for it (enqueued and
            # taken now, started once every effect has started), one wake-up and task
            # switch less; records are the same. Any number of synchronous effects
            # can be run so, and the last effect that waits (see `start`).
            if effect.system in ex.jobs.synchronous:
                worker = ex.jobs.effects.take_now(job)
                if worker is not None:
                    held.append((job, worker))
                    return not self.join.resolved
            elif index == self.last_waiting:
                worker = ex.jobs.effects.take_now(job)
                if worker is not None:
                    self.held_wait = (job, worker)
                    return not self.join.resolved
        try:
            ex.jobs.effects.enqueue(job)
        except EffectError as exc:
            job.finish(
                FAIL, error_type=exc.kind, error_message=str(exc), status_hint=exc.status_hint
            )
        else:
            self.queued = True
        return not self.join.resolved

    def _effect_done(self, job: Job) -> None:
        st = job.state
        if self.join.resolved:  # cancelled after resolution
            return
        effect = st.effect
        assert effect is not None
        success = st.success is True
        if success and effect.slot is not None:
            record = self.record
            record.current_job = st.index
            self.ctx.put_raw(effect.slot.name, job.result)
            record.current_job = None
        if not success and effect.required and self.error is None:
            self.error = st
        if not self.join.add(success=success, required=effect.required):
            if self.need.mode is Mode.SEQUENTIAL and self.next_effect < len(self.effects):
                self._start_next()
            return
        self._resolved()

    def _resolved(self) -> None:
        rec = self.rec
        join = self.join
        rec.join_ts = self.executor.clock.now_ns()
        rec.completed = join.succeeded
        rec.failed = join.failed
        for job in self.jobs:
            if not job.finished:
                job.cancel("join resolved")
        if join.failure:
            err = self.error
            assert err is not None
            self.outcome = Fail(
                err.status_hint or 500,
                f"required effect failed: {err.error_type}",
                key=err.name,
            )
            self.done.set()
            return
        then = self.need.then
        if then is None:
            self.outcome = Continue
            self.done.set()
            return
        self._enqueue_continuation(then)

    def _enqueue_continuation(self, then: Step) -> None:
        ex = self.executor
        record = self.record
        st = JobState(
            index=len(record.jobs),
            kind="continuation",
            name=f"step.{then.name}.resume",
            queue=ex.jobs.continuations.name,
            step_index=self.step_index,
        )
        record.jobs.append(st)
        job = Job(st, ex.clock, self._run_continuation, self._continuation_done, record)
        self.cont_job = job
        # An idle continuation worker: the request's own task runs the job for it
        # (enqueued and taken now, started when the task resumes), one task switch less.
        worker = ex.jobs.continuations.take_now(job)
        if worker is not None:
            self.cont_worker = worker
            self.done.set()
            return
        try:
            ex.jobs.continuations.enqueue(job)
        except EffectError as exc:
            job.finish(
                FAIL, error_type=exc.kind, error_message=str(exc), status_hint=exc.status_hint
            )

    def run_held_continuation(self) -> None:
        """On the request's task: run the continuation taken for it, then give the
        continuation worker back."""
        worker, self.cont_worker = self.cont_worker, None
        job = self.cont_job
        assert worker is not None and job is not None
        self.outcome = None
        try:
            if not job.finished:  # not cancelled meanwhile
                self._run_continuation_now(job)
        finally:
            self.executor.jobs.continuations.give_back(worker)

    async def _run_continuation(self, job: Job) -> None:
        self._run_continuation_now(job)

    def _run_continuation_now(self, job: Job) -> None:
        then = self.need.then
        assert then is not None
        st = job.state
        record = self.record
        st.start_ts = record.clock.now_ns()
        st.attempts = 1
        sr = _record_step(record, then, "continuation", self.sequence, job_index=st.index)
        st.cont_step_index = sr.index
        st.span_id = sr.span_id
        record.current_job = st.index
        try:
            result = call_step(self.ctx, record, then, sr)
        finally:
            record.current_job = None
        job.result = result
        if isinstance(result, PipelineError):
            job.finish(
                FAIL, error_type=result.error_type, error_message=str(result), status_hint=500
            )
        else:
            job.finish(COMPLETE)

    def _continuation_done(self, job: Job) -> None:
        st = job.state
        result = job.result
        if isinstance(result, PipelineError) or st.success:
            self.outcome = result
        elif st.error_type == "queue_full":
            self.outcome = Fail(429, "continuations queue is full", key=st.queue)
        else:
            self.outcome = PipelineError(
                f"continuation {st.name!r} ended with {st.outcome}: {st.error_message}",
                error_type=st.error_type or "continuation_failed",
            )
        self.done.set()

    def cancel(self, reason: str) -> None:
        if not self.join.resolved:
            self.join.resolved = True
        for job in self.jobs:
            job.cancel(reason)
        held, self.held = self.held, None
        while held:
            self.executor.jobs.effects.give_back(held.popleft()[1])
        held_wait, self.held_wait = self.held_wait, None
        if held_wait is not None:
            self.executor.jobs.effects.give_back(held_wait[1])
        if self.cont_job is not None:
            self.cont_job.cancel(reason)
        worker, self.cont_worker = self.cont_worker, None
        if worker is not None:
            self.executor.jobs.continuations.give_back(worker)


class Executor:
    """Runs pipelines for one app (shared by all its requests)."""

    __slots__ = ("clock", "jobs", "max_depth", "wakeup")

    def __init__(self, clock: Clock, jobs: JobSystem, *, max_depth: int = 16) -> None:
        self.clock = clock
        self.jobs = jobs
        self.max_depth = max_depth
        self.wakeup = wakeup_factory()  # made where the app runs: inside its event loop

    async def run(
        self,
        ctx: Context,
        record: RequestRecord,
        steps: Sequence[tuple[Step, str]],
        sequence: int,
    ) -> Done | Fail | PipelineError:
        """Run ``steps`` (each with its layer) until one answers."""
        for step, layer in steps:
            sequence += 1
            sr = _record_step(record, step, layer, sequence)
            decision = call_step(ctx, record, step, sr)
            depth = 0
            while isinstance(decision, Need):
                depth += 1
                if depth > self.max_depth:
                    return PipelineError(
                        f"step {step.name!r}: more than {self.max_depth} chained Needs",
                        error_type="NeedDepthExceeded",
                    )
                decision = await self._need(ctx, record, decision, sr, sequence)
                if isinstance(decision, Need):
                    sr = record.steps[-1]  # the continuation that asked again
            if decision is Continue:
                continue
            assert isinstance(decision, Done | Fail | PipelineError)
            return decision
        return PipelineError(
            "every step returned Continue and none answered the request",
            error_type="NoResponse",
        )

    async def _need(
        self, ctx: Context, record: RequestRecord, need: Need, sr: StepRecord, sequence: int
    ) -> Decision | PipelineError:
        rec = NeedRecord(
            self.clock.now_ns(),
            len(need.effects),
            need.mode.value,
            need.join.value,
            need.then.name if need.then is not None else None,
        )
        sr.need = rec
        run = _NeedRun(self, ctx, record, need, rec, sr.index, sequence)
        try:
            run.start()
            if run.held or run.held_wait is not None:
                await run.run_held_effects()
            await run.done.wait()
            if run.cont_worker is not None:
                run.run_held_continuation()
        except BaseException:
            run.cancel("request cancelled")
            raise
        outcome = run.outcome
        assert outcome is not None
        return outcome
