"""The read deadline of `AccessMiddleware`, over hand-written ASGI apps: a read whose response
starts after the deadline is a 503, however the event loop happens to order the response and
the timer; one that starts in time is answered as its handler answered."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from starlette.types import Message, Receive, Scope, Send

from service.security.access import AccessMiddleware, Limits

DEADLINE = 0.05


def middleware(app: Any, deadline: float = DEADLINE) -> AccessMiddleware:
    return AccessMiddleware(
        app, authenticator=None, audit=None, limits=Limits(request_timeout_seconds=deadline)
    )


async def answer(app: Any, method: str = "GET", deadline: float = DEADLINE) -> list[Message]:
    """What the middleware sends for one request to /fhir/Patient."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "method": method,
        "path": "/fhir/Patient",
        "raw_path": b"/fhir/Patient",
        "query_string": b"name=x",
        "headers": [(b"host", b"testserver")],
        "scheme": "http",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 50000),
        "root_path": "",
        "http_version": "1.1",
        "state": {},
    }
    await middleware(app, deadline)(scope, receive, send)
    return sent


async def respond(send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/fhir+json")],
        }
    )
    await send({"type": "http.response.body", "body": b'{"resourceType":"Bundle"}'})


async def overran_without_yielding(scope: Scope, receive: Receive, send: Send) -> None:
    """A handler whose synchronous work holds the event loop past the deadline, then answers
    at once: its response starts before the loop has had a turn to run the timer."""
    time.sleep(DEADLINE * 3)
    await respond(send)


async def in_time(scope: Scope, receive: Receive, send: Send) -> None:
    await respond(send)


async def never_answers(scope: Scope, receive: Receive, send: Send) -> None:
    await asyncio.sleep(60)


def status_of(sent: list[Message]) -> int:
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, sent
    return int(starts[0]["status"])


def body_of(sent: list[Message]) -> Any:
    return orjson.loads(b"".join(m.get("body", b"") for m in sent if "body" in m))


def test_a_response_that_starts_after_the_deadline_is_503() -> None:
    for _ in range(5):
        sent = asyncio.run(answer(overran_without_yielding))
        assert status_of(sent) == 503
        outcome = body_of(sent)
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["code"] == "timeout"
        assert (b"retry-after", b"5") in next(
            m["headers"] for m in sent if m["type"] == "http.response.start"
        )


def test_a_handler_that_never_answers_is_cut_off_at_the_deadline() -> None:
    began = time.perf_counter()
    sent = asyncio.run(answer(never_answers))
    assert status_of(sent) == 503
    assert time.perf_counter() - began < 5


def test_a_read_answered_in_time_is_sent_as_it_was() -> None:
    sent = asyncio.run(answer(in_time))
    assert status_of(sent) == 200
    assert body_of(sent) == {"resourceType": "Bundle"}


def test_a_write_has_no_deadline() -> None:
    async def slow_write(scope: Scope, receive: Receive, send: Send) -> None:
        time.sleep(DEADLINE * 3)
        await respond(send)

    sent = asyncio.run(answer(slow_write, method="POST"))
    assert status_of(sent) == 200


def test_a_read_whose_handler_fails_is_not_held_until_the_deadline() -> None:
    """A handler that fails before it answers: its error goes on to the app's error handling
    (a 500) at once, not a 503 "took too long" once the deadline has passed."""

    class Broken(Exception):
        pass

    async def fails(scope: Scope, receive: Receive, send: Send) -> None:
        raise Broken()

    began = time.perf_counter()
    with pytest.raises(Broken):
        asyncio.run(answer(fails, deadline=30))
    assert time.perf_counter() - began < 5
