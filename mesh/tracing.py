"""OpenTelemetry traces of a task across the mesh's processes: one trace per run of a task.

Off unless an OTLP endpoint is configured with OpenTelemetry's own variables, which the SDK reads:
OTEL_EXPORTER_OTLP_ENDPOINT (e.g. http://collector:4318) or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, spans sent
over OTLP/HTTP (protobuf) in batches (OTEL_BSP_SCHEDULE_DELAY, ...). OTEL_SDK_DISABLED=true turns them off
again. Off, every function here returns at once and nothing is recorded.

How a trace spans processes:
- The gateway opens the run's root span, `posemesh.task`, as it starts the task (gateway/lifecycle.py),
  and sends its context (W3C `traceparent`) in the Kafka headers of the task's TaskStarted record on
  posemesh.control, the record every worker reads before the task's frames. The gateway's decoding
  (`posemesh.decode`: container to JPEG frames on raw_frames) is a child span.
- A worker takes the context from that record's headers (stages/control.py) and records, as children:
  each batch's work on the task (`posemesh.<stage>`, one span per task in a batch, with the frames it
  held), the Triton calls made for that batch (`triton <model>`), and the end of its step
  (`posemesh.<stage>.finish`: annotate's assembly and publication of the results).
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
from contextlib import contextmanager

log = logging.getLogger("posemesh.tracing")

_tracer = None  # set by setup() when tracing is on
# The Triton calls made while a batch is processed (stages/triton.py adds to it): (model, start ns, end ns)
_calls: contextvars.ContextVar[list | None] = contextvars.ContextVar("posemesh_triton_calls", default=None)


def configured() -> bool:
    """Whether the environment asks for traces."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def setup(service: str) -> bool:
    """At a process's start: export this process's spans as `service` when the environment asks for it."""
    global _tracer
    if not configured():
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("posemesh")
    log.info("traces: exported over OTLP/HTTP as service %s", service)
    return True


def shutdown() -> None:
    """Send what is buffered (at a clean stop)."""
    if _tracer is not None:
        from opentelemetry import trace

        trace.get_tracer_provider().shutdown()


def enabled() -> bool:
    return _tracer is not None


# ---------------------------------------------------------------------------------------------- gateway


@contextmanager
def task_span(task_id: str, attributes: dict | None = None):
    """The root span of a task's run; yields the Kafka headers that carry its context ([] when off)."""
    if _tracer is None:
        yield []
        return
    from opentelemetry.propagate import inject

    with _tracer.start_as_current_span("posemesh.task", attributes={"posemesh.task_id": task_id, **(attributes or {})}):
        carrier: dict[str, str] = {}
        inject(carrier)
        yield [(k, v.encode()) for k, v in carrier.items()]


def current() -> object | None:
    """The context of the span current on this thread, to hand to another thread (None when off)."""
    if _tracer is None:
        return None
    from opentelemetry import context

    return context.get_current()


def context_of(headers) -> object | None:
    """The trace context carried by a record's Kafka headers (None when off or when there is none)."""
    if _tracer is None or not headers:
        return None
    from opentelemetry.propagate import extract

    carrier = {}
    for key, value in headers:
        if value is not None:
            carrier[key] = value.decode() if isinstance(value, bytes) else value
    return extract(carrier) if carrier else None


@contextmanager
def child_span(name: str, context, attributes: dict | None = None):
    """A span under a task's context, current for the block (nothing when off or without a context)."""
    if _tracer is None or context is None:
        yield
        return
    with _tracer.start_as_current_span(name, context=context, attributes=attributes or {}):
        yield


# ---------------------------------------------------------------------------------------------- workers


@contextmanager
def batch(stage: str, entries) -> None:
    """Around one batch of a stage (pooled entries, each with its FrameItem `.item`): afterwards, a
    `posemesh.<stage>` span per task in the batch (under the task's context, `item.task.trace`), each with
    the batch's Triton calls as children. Off, nothing is looked at."""
    if _tracer is None:
        yield
        return
    calls: list = []
    token = _calls.set(calls)
    start = time.time_ns()
    try:
        yield
    finally:
        _calls.reset(token)
        end = time.time_ns()
        _record_batch(stage, [e.item for e in entries], calls, start, end)


def _record_batch(stage: str, items, calls: list, start: int, end: int) -> None:
    from opentelemetry import trace

    per_task: dict[str, list] = {}
    for item in items:
        per_task.setdefault(item.task_id, []).append(item)
    for task_id, mine in per_task.items():
        context = mine[0].task.trace
        if context is None:
            continue
        span = _tracer.start_span(f"posemesh.{stage}", context=context, start_time=start, attributes={
            "posemesh.task_id": task_id, "posemesh.frames": len(mine), "posemesh.batch_frames": len(items),
            "posemesh.first_frame": min(i.frame.index for i in mine)})
        inside = trace.set_span_in_context(span)
        for model, call_start, call_end, size in calls:
            _tracer.start_span(f"triton {model}", context=inside, start_time=call_start,
                               attributes={"posemesh.model": model, "posemesh.batch_size": size}).end(end_time=call_end)
        span.end(end_time=end)


def triton_call_started() -> tuple[list | None, int]:
    """Where a Triton call made now is recorded, and when it started (stages/triton.py: the call's answer
    comes on another thread, so the list is taken when the call is made)."""
    return _calls.get(), time.time_ns()


def triton_call_ended(calls: list | None, start: int, *, model: str, size: int) -> None:
    if calls is not None:
        calls.append((model, start, time.time_ns(), size))
