"""Which kernel MetaSchedule tunes next, and when a time budget stops the session.

MetaSchedule's own schedulers cannot keep a wall-clock budget: the gradient scheduler first
sends one batch of every task before it looks at any result (for ResNet-50's ~25 kernels that
first round alone takes longer than 15 minutes on 2 cores), and terminating a task from a
measure callback fails MetaSchedule's ``!task->is_terminated`` check when that task is the one
being joined. So edgekit picks tasks itself (``Budget.scheduler``, a ``PyTaskScheduler``):

1. At every pick, finished batches are joined first (their results reach the cost model and
   the progress line); once the deadline has passed the scheduler answers "no task" (-1), and
   MetaSchedule joins what is still in flight and ends the session cleanly. The budget is
   overrun by at most the batch that is running.
2. Tasks never measured go first, the largest estimated work first (weight × FLOPs), so a
   short budget spends its time on the kernels that dominate the model.
3. Then the task with the largest ``weight × best time / batches`` (the second term of
   MetaSchedule's gradient: time still on the table, discounted by effort already spent).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable


class Budget:
    """Shared state of one tuning session: trials done, best time and batches per task."""

    def __init__(self, total: int, minutes: float | None, progress: Callable[[str], None]):
        self.total, self.progress = total, progress
        self.t0 = time.perf_counter()  # the session's clock: the deadline and elapsed time
        self.deadline = self.t0 + minutes * 60 if minutes is not None else None
        self.done = 0
        self.best: dict[int, float] = {}  # task id -> best median seconds measured
        self.batches: dict[int, int] = {}  # task id -> batches sent

    def expired(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    def record(self, task_id: int, runner_results) -> None:
        self.done += len(runner_results)
        for result in runner_results:
            if result.error_msg is None and result.run_secs:
                secs = statistics.median(getattr(s, "value", s) for s in result.run_secs)
                self.best[task_id] = min(self.best.get(task_id, math.inf), secs)
        elapsed = time.perf_counter() - self.t0
        if self.deadline is None:
            self.progress(f"tuning: {self.done}/{self.total} trials, {elapsed:.0f} s")
        else:
            self.progress(f"tuning: {self.done} trials, {len(self.batches)} kernels, "
                          f"{elapsed:.0f}/{self.deadline - self.t0:.0f} s")

    def pick(self, tasks) -> int:
        """The next task id among ``tasks`` (MetaSchedule TaskRecords), or -1 to stop."""
        alive = [i for i, t in enumerate(tasks) if not t.is_terminated]
        if not alive or self.expired():
            return -1
        fresh = [i for i in alive if i not in self.batches]
        if fresh:
            pick = max(fresh, key=lambda i: tasks[i].task_weight * tasks[i].flop)
        else:
            pick = max(alive, key=lambda i: tasks[i].task_weight * self.best.get(i, -1.0)
                       / self.batches[i])
        self.batches[pick] = self.batches.get(pick, 0) + 1
        return pick

    def measure_callback(self):
        """A MetaSchedule measure callback that feeds ``record``."""
        from tvm.ir.utils import derived_object
        from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

        budget = self

        @derived_object
        class _Record(PyMeasureCallback):
            def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                      runner_results) -> None:
                budget.record(task_id, runner_results)

        return _Record()

    def scheduler(self):
        """A MetaSchedule task scheduler that asks ``pick``."""
        from tvm.ir.utils import derived_object
        from tvm.s_tir.meta_schedule.task_scheduler import PyTaskScheduler

        budget = self

        @derived_object
        class _Scheduler(PyTaskScheduler):
            def next_task_id(self) -> int:
                outer = self._outer()
                tasks = outer.tasks_
                for i in range(len(tasks)):
                    outer.touch_task(i)  # join finished batches
                pick = budget.pick(tasks)
                if pick >= 0 and tasks[pick].measure_candidates is not None:
                    outer.join_running_task(pick)  # a task is sent again only once joined
                return pick

        return _Scheduler()
