"""What `GET /metrics` reports, in Prometheus' text format: requests, their latency and queue wait, batch sizes, the
queue, the tasks, prompt loads and tokens. Each app has a registry of its own (not prometheus_client's global one),
so several apps in one process (tests, benchmarks) count apart. Names are vLLM's (`vllm:` as `softprompt:`) or
LoRAX's where they mean the same thing; docs/serving.md lists them."""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """One app's metrics. The batcher reports each job's wait and each forward's rows (`waited`, `ran`); the routes
    and the watcher the rest; the queue and the tasks are read when scraped (`track`)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("softprompt:requests", "HTTP requests answered, by route, task (or OpenAI model) and "
                                "status", ["route", "task", "status"], registry=registry)
        self.latency = Histogram("softprompt:e2e_request_latency_seconds", "from a request's arrival to its answer's "
                                 "last byte", ["route"], buckets=SECONDS, registry=registry)
        self.queue_time = Histogram("softprompt:request_queue_time_seconds", "from a request's arrival in the batcher "
                                    "to the start of its first batch", buckets=SECONDS, registry=registry)
        self.batch_rows = Histogram("softprompt:batch_next_size", "rows per forward (inputs of any tasks in one "
                                    "batch)", buckets=ROWS, registry=registry)
        self.waiting = Gauge("softprompt:num_requests_waiting", "inputs queued for a batch (each input counted, as "
                             "vLLM counts each prompt of a list)", registry=registry)
        self.tasks = Gauge("softprompt:tasks_loaded", "tasks served", registry=registry)
        self.loads = Counter("softprompt:prompt_loads", "prompts loaded, by source: api (POST /v1/prompts) or watch "
                             "(the --watch folder)", ["source"], registry=registry)
        self.load_failures = Counter("softprompt:prompt_load_failures", "prompts that failed to load, by source",
                                     ["source"], registry=registry)
        self.prompt_tokens = Counter("softprompt:prompt_tokens", "input tokens accepted, templates included, virtual "
                                     "tokens not", registry=registry)
        self.generation_tokens = Counter("softprompt:generation_tokens", "tokens generated", registry=registry)

    def track(self, waiting: Callable[[], int], tasks: Callable[[], int]) -> None:
        """Read the queue's rows and the number of tasks whenever the metrics are scraped."""
        self.waiting.set_function(waiting)
        self.tasks.set_function(tasks)

    def waited(self, seconds: float) -> None:
        self.queue_time.observe(seconds)

    def ran(self, rows: int) -> None:
        self.batch_rows.observe(rows)

    def loaded(self, source: str, ok: bool) -> None:
        (self.loads if ok else self.load_failures).labels(source).inc()


class Counted:
    """ASGI middleware, outside every other: each HTTP request counted by route, task and status, and timed to its
    answer's last byte (a stream's too). The task is what the route put in `request.state.task` (a known task
    only, so the label's values stay the server's own)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), 500

        async def counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            # the route's template (e.g. /v1/prompts/{task}), as routing left it; none when refused before routing
            route = getattr(scope.get("route"), "path", "none")
            self.metrics.requests.labels(route, scope.get("state", {}).get("task", ""), str(status)).inc()
            self.metrics.latency.labels(route).observe(time.monotonic() - started)
