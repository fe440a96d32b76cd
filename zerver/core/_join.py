"""Join rules: when a ``Need`` is resolved and whether it failed.

A sans-I/O state machine fed one finished effect at a time. The table it
implements (docs/concepts.md shows the same table):

=============  =====================================  ====================================
join           resolves when                          fails when
=============  =====================================  ====================================
all            every effect finished, or at once      a required effect failed
               when a required effect fails
all_required   every required effect finished         a required effect failed
               (optional ones still running are
               cancelled), or at once when a
               required effect fails; with no
               required effect, like ``all``
any            the first effect finishes, either way  that first effect is required and
                                                      failed
first_success  the first effect succeeds, or all      all failed and at least one was
               finished                               required
=============  =====================================  ====================================

Optional failures never fail a join on their own. Once resolved, effects
still queued or running are cancelled and, in sequential mode, effects not
yet started are never started.
"""

from __future__ import annotations

from ._decisions import Join

__all__ = ["JoinState"]


class JoinState:
    """Counts finished effects of one ``Need`` and decides resolution."""

    __slots__ = (
        "failed",
        "failure",
        "finished",
        "join",
        "req_failed",
        "req_finished",
        "required_total",
        "resolved",
        "succeeded",
        "total",
    )

    def __init__(self, join: Join, required_flags: list[bool]) -> None:
        self.join = join
        self.total = len(required_flags)
        self.required_total = sum(required_flags)
        if join is Join.ALL_REQUIRED and self.required_total == 0:
            self.join = Join.ALL
        self.finished = 0
        self.req_finished = 0
        self.succeeded = 0
        self.failed = 0
        self.req_failed = 0
        self.resolved = False
        self.failure = False

    def add(self, *, success: bool, required: bool) -> bool:
        """Feed one finished effect; returns whether the join is now resolved."""
        if self.resolved:
            raise RuntimeError("join already resolved")
        self.finished += 1
        if required:
            self.req_finished += 1
        if success:
            self.succeeded += 1
        else:
            self.failed += 1
            if required:
                self.req_failed += 1
        join = self.join
        if join is Join.ALL:
            if not success and required:
                return self._resolve(failure=True)
            if self.finished == self.total:
                return self._resolve(failure=False)
        elif join is Join.ALL_REQUIRED:
            if not success and required:
                return self._resolve(failure=True)
            if self.req_finished == self.required_total:
                return self._resolve(failure=False)
        elif join is Join.ANY:
            return self._resolve(failure=not success and required)
        else:  # FIRST_SUCCESS
            if success:
                return self._resolve(failure=False)
            if self.finished == self.total:
                return self._resolve(failure=self.req_failed > 0)
        return False

    def _resolve(self, *, failure: bool) -> bool:
        self.resolved = True
        self.failure = failure
        return True
