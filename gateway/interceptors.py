"""What every TaskService call passes through around its method: one concern per interceptor, with
grpc.aio's own interceptor API. `for_task_service` gives them in order, outermost first:

1. `Statuses`: a refusal raised anywhere inside (`Refused`, `LimitExceeded`) becomes the call's status and
   message; any other exception becomes INTERNAL with a reference to the log entry that holds the
   traceback. The caller never sees a server path, a traceback or an exception's text.
2. `UploadOutcomes`: counts each Upload by outcome (accepted, or its status code) and its accepted bytes.
3. `Authentication`: `authorization: Bearer <key>` -> the user (gateway/auth.py's rules: fails closed,
   one header only), handed to the method through `auth.CALLER`; UNAUTHENTICATED before the method runs.
4. `StreamLimits`: every streaming call (Upload, WatchTask, WatchFrames, DownloadResult) holds one of the
   caller's MAX_STREAMS_PER_USER stream slots while it is open.

They act on TaskService's methods only: health and reflection, served by the same server, pass through
untouched (load balancers and `grpcurl list` need no key).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
from contextlib import asynccontextmanager

import grpc

from posemesh.gateway.auth import CALLER, Authenticator, caller
from posemesh.gateway.limits import LimitExceeded, UserLimits
from posemesh.gateway.metrics import UPLOAD_BYTES, UPLOADS
from posemesh.gateway.validation import Refused
from posemesh.v1 import task_service_pb2 as tpb

log = logging.getLogger("posemesh.gateway")

SERVICE = f"/{tpb.DESCRIPTOR.services_by_name['TaskService'].full_name}/"
UPLOAD = SERVICE + "Upload"
# What a refused stream would have been, for the message (close one before opening ...).
STREAM_KINDS = {"Upload": "another upload", "WatchTask": "another watch", "WatchFrames": "another frame watch",
                "DownloadResult": "another download"}


def for_task_service(auth: Authenticator, limits: UserLimits) -> list[grpc.aio.ServerInterceptor]:
    return [Statuses(), UploadOutcomes(), Authentication(auth), StreamLimits(limits)]


def around(handler: grpc.RpcMethodHandler, scope) -> grpc.RpcMethodHandler:
    """`handler` with each call run inside `scope(context)`, an async context manager, whatever the
    method's shape (unary or streaming requests; one response, an async generator of them, or writes)."""
    def call(behavior):
        async def one(request, context):
            async with scope(context):
                return await behavior(request, context)
        return one

    def stream(behavior):
        if not inspect.isasyncgenfunction(behavior):
            return call(behavior)  # a method that writes its responses with context.write()

        async def responses(request, context):
            async with scope(context):
                async for response in behavior(request, context):
                    yield response
        return responses

    types = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(call(handler.unary_unary), *types)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(call(handler.stream_unary), *types)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), *types)
    return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), *types)


class Statuses(grpc.aio.ServerInterceptor):
    """Refusals and failures -> statuses with a message a person can act on."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(SERVICE):
            return handler
        method = details.method

        @asynccontextmanager
        async def statuses(context):
            try:
                yield
            except Refused as exc:
                await context.abort(exc.code, exc.message, trailing_metadata=exc.trailers)
            except LimitExceeded as exc:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            except grpc.aio.AbortError:
                raise  # already a status
            except Exception:
                reference = secrets.token_hex(4)
                log.exception("%s failed (error reference %s)", method, reference)
                await context.abort(grpc.StatusCode.INTERNAL,
                                    f"the gateway failed to handle this call (error reference {reference}); try "
                                    "again, and if it keeps failing give the operator this reference")

        return around(handler, statuses)


class UploadOutcomes(grpc.aio.ServerInterceptor):
    """posemesh_gateway_uploads_total by outcome, posemesh_gateway_upload_bytes_total (gateway/metrics.py)."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method != UPLOAD:
            return handler
        upload = handler.stream_unary

        async def counted(requests, context):
            try:
                response = await upload(requests, context)
            except Refused as exc:
                UPLOADS.labels(exc.code.name.lower()).inc()
                raise
            except LimitExceeded:
                UPLOADS.labels("resource_exhausted").inc()
                raise
            except asyncio.CancelledError:
                UPLOADS.labels("cancelled").inc()
                raise
            except grpc.aio.AbortError:
                raise
            except Exception:
                UPLOADS.labels("internal").inc()  # what Statuses makes of it
                raise
            UPLOADS.labels("accepted").inc()
            UPLOAD_BYTES.inc(response.task.upload_bytes)
            return response

        return grpc.stream_unary_rpc_method_handler(counted, handler.request_deserializer,
                                                    handler.response_serializer)


class Authentication(grpc.aio.ServerInterceptor):
    """The caller's API key -> auth.CALLER for the method; a call without a usable key never reaches it."""

    def __init__(self, auth: Authenticator):
        self.auth = auth

    async def intercept_service(self, continuation, details):
        if not details.method.startswith(SERVICE):
            return await continuation(details)
        user, problem = self.auth.user_of(details.invocation_metadata)
        if user is not None:
            CALLER.set(user)  # this call's context: the method runs in it
        handler = await continuation(details)
        if handler is None or user is not None:
            return handler

        @asynccontextmanager
        async def refused(_context):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, problem)
            yield  # never reached: the method does not run

        return around(handler, refused)


class StreamLimits(grpc.aio.ServerInterceptor):
    """At most MAX_STREAMS_PER_USER streaming calls open per user (RESOURCE_EXHAUSTED naming the limit)."""

    def __init__(self, limits: UserLimits):
        self.limits = limits

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if (handler is None or not details.method.startswith(SERVICE)
                or not (handler.request_streaming or handler.response_streaming)):
            return handler
        what = STREAM_KINDS.get(details.method.removeprefix(SERVICE), "another stream")

        @asynccontextmanager
        async def slot(_context):
            with self.limits.stream_slot(caller(), what):
                yield

        return around(handler, slot)
