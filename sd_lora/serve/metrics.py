"""Prometheus metrics of one service (its own registry, so several apps in one process, as in the
tests, count separately). Names are prefixed `sdlora_`; GET /metrics serves them as Prometheus text."""

from __future__ import annotations

import threading
import time
from collections import deque

RATE_WINDOW = 60.0  # seconds of wall time that sdlora_images_per_second averages over


class ServeMetrics:
    def __init__(self, queue_depth=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("sdlora_queue_depth", "Requests waiting in the queue", registry=r)
        if queue_depth is not None:
            self.queue_depth.set_function(queue_depth)
        self.requests = Counter("sdlora_requests", "Generation requests by HTTP status (499: the client went away "
                                "and its queued work was cancelled)", ["status"], registry=r)
        self.switches = Counter("sdlora_stack_switches", "Times a different LoRA stack was fused into the base", registry=r)
        self.switch_seconds = Histogram("sdlora_stack_switch_seconds", "Seconds per stack switch", registry=r,
                                        buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.generation_seconds = Histogram("sdlora_generation_seconds", "Seconds per pipeline call (one batch)", registry=r,
                                            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.wait_seconds = Histogram("sdlora_queue_wait_seconds", "Seconds a request waited before its batch started",
                                      registry=r, buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.images = Counter("sdlora_images", "Images generated", registry=r)
        self.batch_images = Histogram("sdlora_batch_images", "Images per pipeline call", registry=r,
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
        self.images_per_second = Gauge("sdlora_images_per_second",
                                       f"Images generated per second of wall time over the last {RATE_WINDOW:g} s", registry=r)
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self.images_per_second.set_function(self._rate)

    def request(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    def switched(self, seconds: float) -> None:
        self.switches.inc()
        self.switch_seconds.observe(seconds)

    def waited(self, seconds: float) -> None:
        self.wait_seconds.observe(seconds)

    def generated(self, images: int, seconds: float) -> None:
        self.images.inc(images)
        self.batch_images.observe(images)
        self.generation_seconds.observe(seconds)
        with self._lock:
            self._recent.append((time.monotonic(), images))

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW:
                self._recent.popleft()
            n = sum(k for _, k in self._recent)
        return n / max(1e-9, min(RATE_WINDOW, now - self._started))

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
