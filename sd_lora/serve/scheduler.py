"""The service's worker: one thread owns the pipeline and serves queued requests, grouped by LoRA stack.

Why group: switching a stack costs a copy + GEMM per touched weight (bench/bench_stack.py); a request
with the stack that is already fused costs nothing extra. So requests with the same stack are served
back to back, and those that can share a pipeline call are batched.

Policy (`policy="grouped"`, the default), each time the worker is free:
  1. The oldest queued request is the *lead* if it has waited at least `max_wait` seconds (overdue).
  2. Otherwise the lead is the oldest request whose stack is fused now (no switch), or, when none
     has, the oldest request (its stack is switched in once for its whole group).
  3. The batch is the lead plus the following requests (in arrival order) with the lead's *batch
     key*: same stack, steps, size, guidance (and guidance rescale), while their images add up to at
     most `max_batch`. It is rendered in one pipeline call (`sd_lora.generation.render_batch`); a batch
     of one image is rendered by `sd_lora.generate` itself, so that image equals the request run
     alone bit for bit. A request for more than `max_batch` images is rendered alone, one image per
     call, by `sd_lora.generate`.
`policy="fifo"` always takes the oldest request as the lead (step 1 only), batching in the same way:
strict arrival order, for comparison (bench/bench_serve.py).

Bound on waiting. Requests are served out of arrival order only while the oldest queued request has
waited less than `max_wait`, and then every other queued request (younger) has too. From the moment a
request R has waited `max_wait`, every request the worker leads with is older than R until R's own
turn, as in FIFO order. So R waits at most

    max_wait + the batch running at that moment + the batches of the requests older than R,

i.e. no more than `max_wait` plus one batch beyond what arrival order gives it for the requests ahead
of it (those batches may carry younger requests of the same batch key along, up to `max_batch`
images each, which arrival order would batch too when they are adjacent). docs/serve.md states it.

Failures. A request whose stack cannot be applied (a file damaged after it was listed), or whose
generation fails (out of memory, ...), leaves the base restored (`remove_loras`: bit for bit) and fails
alone: a failing batch of several requests is retried one request at a time, so only the one that
fails again gets the error. Cancelled requests (the client went away) are taken out of the queue and
never rendered.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

POLICIES = ("grouped", "fifo")


class QueueFull(Exception):
    """The queue holds `max_queue` requests; `retry_after` is the estimated seconds until it has room."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The scheduler was closed before the request ran."""


@dataclass(eq=False)
class Job:
    """One request: what `sd_lora.generate` is called with, and what `generate(..., render=False)`
    made of it (its resolved stack and settings). `future` gets the GenerationResult or the error."""

    call: dict[str, Any]  # generate() keyword arguments (prompt, stack, seed, steps, ...; not the pipeline)
    plan: Any  # GenerationResult without images (generate(pipe, **call, render=False))
    num_images: int = 1
    arrived: float = field(default_factory=time.monotonic)
    started: float | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def stack_key(self) -> tuple:
        """The fused state this request needs: each file with its weights, in order."""
        return tuple((x["file"], x["weight"], x["te_weight"]) for x in self.plan.settings["loras"])

    @property
    def batch_key(self) -> tuple:
        from ..generation import BATCH_KEYS

        s = self.plan.settings
        return (self.stack_key,) + tuple(s[k] for k in BATCH_KEYS if k != "loras")


class Scheduler:
    """Queue + worker thread for one pipeline. `submit(job)` returns the job's future (or raises
    QueueFull); `cancel(job)` takes a queued job out. See the module docstring for the order."""

    def __init__(self, pipe, *, max_queue: int = 32, max_batch: int = 4, max_wait: float = 5.0,
                 policy: str = "grouped", metrics=None, strict: bool = True, start: bool = True):
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r}: use one of {', '.join(POLICIES)}")
        if max_queue < 1 or max_batch < 1 or max_wait < 0:
            raise ValueError("max_queue and max_batch must be at least 1, max_wait at least 0")
        self.pipe = pipe
        self.max_queue, self.max_batch, self.max_wait, self.policy = int(max_queue), int(max_batch), float(max_wait), policy
        self.metrics = metrics
        self.strict = strict
        self._queue: list[Job] = []  # arrival order
        self._cond = threading.Condition()
        self._closed = False
        # The stack key fused in the pipeline now: () the base, None unknown (at the start: the pipeline
        # may hold a stack from before, so the first batch applies its own).
        self._current: tuple | None = None
        self._job_seconds = 1.0  # running mean of the time per request, for Retry-After
        self.switches = 0
        self.batches: list[int] = []  # requests per pipeline call, for tests and the benchmark
        self._thread = threading.Thread(target=self._run, name="sd-lora-serve-worker", daemon=True)
        if start:
            self.start()

    # -- the client side ------------------------------------------------------------------------

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(max(1, round(self._job_seconds * (len(self._queue) + 1))))
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def cancel(self, job: Job) -> bool:
        """Take `job` out of the queue (True), or False when it is already running or done."""
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                job.future.cancel()
                return True
        return False

    def close(self, timeout: float | None = 30) -> None:
        """Stop taking requests, fail the queued ones with ShuttingDown, let the running batch finish."""
        with self._cond:
            self._closed = True
            queued, self._queue = self._queue, []
            self._cond.notify_all()
        for job in queued:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown("the server shut down before the request ran"))
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the worker -----------------------------------------------------------------------------

    def _next_batch(self, now: float) -> list[Job]:
        """The jobs of the next pipeline call (the module docstring's policy); removes them from the queue."""
        queue = self._queue
        lead = queue[0]
        if self.policy == "grouped" and now - lead.arrived < self.max_wait:
            lead = next((j for j in queue if j.stack_key == self._current), lead)
        batch, images = [lead], lead.num_images
        if lead.num_images <= self.max_batch:
            key = lead.batch_key
            for job in queue[queue.index(lead) + 1:]:
                if self.policy == "fifo" and job.batch_key != key:
                    break  # arrival order: only adjacent requests share a call
                if job.batch_key == key and images + job.num_images <= self.max_batch:
                    batch.append(job)
                    images += job.num_images
        for job in batch:
            queue.remove(job)
        return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queue:
                    return
                batch = self._next_batch(time.monotonic())
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if batch:
                self._execute(batch)

    def _execute(self, batch: list[Job]) -> None:
        from ..generation import generate, render_batch
        from ..stack import apply_loras

        now = time.monotonic()
        for job in batch:
            if job.started is None and self.metrics:  # (a retried job waited once)
                self.metrics.waited(now - job.arrived)
            job.started = job.started or now
        images = sum(j.num_images for j in batch)
        try:
            key = batch[0].stack_key
            if key != self._current:
                t = time.perf_counter()
                self._current = None  # unknown until the switch has finished
                apply_loras(self.pipe, batch[0].plan.stack, strict=self.strict)
                self._current = key
                self.switches += 1
                if self.metrics:
                    self.metrics.switched(time.perf_counter() - t)
            t = time.perf_counter()
            if len(batch) == 1 and (images == 1 or images > self.max_batch):
                results = [generate(self.pipe, **batch[0].call, keep_loras=True, strict=self.strict)]
                # what generate left fused (the same stack, unless the LoRA folder changed since the check)
                self._current = tuple((x["file"], x["weight"], x["te_weight"]) for x in results[0].settings["loras"])
            else:
                render_batch(self.pipe, [(j.plan, j.num_images) for j in batch], strict=self.strict)
                results = [j.plan for j in batch]
            seconds = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 - any failure: back to the base, fail only the culprit
            self._restore_base()
            if len(batch) > 1:
                logger.warning("A batch of %d requests failed (%s); running them one at a time", len(batch), e)
                for job in batch:
                    self._execute([job])
                return
            logger.warning("Request failed: %s", e, exc_info=logger.isEnabledFor(logging.DEBUG))
            # Without its traceback, whose frames (this one: `batch`, the job, its future) would hold
            # the exception in a reference cycle until a garbage collection.
            batch[0].future.set_exception(e.with_traceback(None))
            return
        self.batches.append(len(batch))
        self._job_seconds = 0.8 * self._job_seconds + 0.2 * (time.monotonic() - now) / len(batch)
        if self.metrics:
            self.metrics.generated(images, seconds)
        for job, result in zip(batch, results):
            job.future.set_result(result)

    def _restore_base(self) -> None:
        from ..stack import remove_loras

        try:
            remove_loras(self.pipe)
            self._current = ()
        except Exception:  # pragma: no cover - the backups are plain copies; should this fail, say so loudly
            logger.exception("Could not restore the base weights after a failed request")
            self._current = None
