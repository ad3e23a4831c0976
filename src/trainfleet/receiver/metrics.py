"""Prometheus metrics of one receiver, on a registry of its own (never the global one).

Queue-derived figures (jobs by status, live workers) are read at scrape time, so
they are right after a restart and across several receivers on one database.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from trainfleet.queue.base import JobQueue

router = APIRouter()


class QueueCollector(Collector):
    """Jobs by status and live workers, read from the queue at each scrape."""

    def __init__(self, queue: Callable[[], JobQueue]) -> None:
        self.queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queue = self.queue()
        jobs = GaugeMetricFamily("trainfleet_jobs", "Jobs by status.", labels=["status"])
        for status, count in queue.counts().items():
            jobs.add_metric([status], count)
        yield jobs
        live = sum(w.alive for w in queue.workers())
        yield GaugeMetricFamily("trainfleet_workers_live", "Workers seen within stale_after_s.",
                                value=live)


class Metrics:
    def __init__(self, queue: Callable[[], JobQueue]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(QueueCollector(queue))
        r = self.registry
        self.claims = Counter("trainfleet_claims", "Jobs handed to workers.", registry=r)
        self.empty_claims = Counter("trainfleet_empty_claims",
                                    "Claims answered with nothing eligible.", registry=r)
        self.heartbeats = Counter("trainfleet_heartbeats", "Heartbeats accepted.", registry=r)
        self.completions = Counter("trainfleet_completions", "Jobs completed.", registry=r)
        self.failures = Counter("trainfleet_failures", "Attempts that failed, by kind.",
                                ["kind"], registry=r)
        self.swept = Counter("trainfleet_swept", "Jobs swept from silent workers.", registry=r)
        self.fenced = Counter("trainfleet_fenced", "Calls refused for a stale lease.",
                              registry=r)
        self.upload_bytes = Counter("trainfleet_upload_bytes", "Bundle bytes stored.",
                                    registry=r)
        self.checkpoints_pruned = Counter("trainfleet_checkpoints_pruned",
                                          "Checkpoints deleted: no job could resume from them.",
                                          registry=r)
        self.checkpoint_bytes_pruned = Counter("trainfleet_checkpoint_bytes_pruned",
                                               "Bytes of the checkpoints deleted.", registry=r)
        self.latency = Histogram(
            "trainfleet_request_seconds", "Request latency by route.", ["method", "route"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LatencyMiddleware:
    """Times every HTTP request, labelled by its route template (never the raw path)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            self.metrics.latency.labels(scope["method"], template).observe(
                time.perf_counter() - started
            )


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics: jobs by status, claims, heartbeats, failures, latency."""
    registry: Metrics = request.app.state.receiver.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)
