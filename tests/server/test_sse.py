"""Server-sent events: each is one line to any line reader; the response cancels the engine
requests it streams however it ends, even when the client is gone before its first byte (a
generator that never started has no cleanup to run)."""

import asyncio
import json

from server.sse import EventStream, sse


class FakeHandle:
    def __init__(self):
        self.cancelled, self.finished = False, False

    def cancel(self):
        self.cancelled = True


def _run(send, receive):
    handles = [FakeHandle(), FakeHandle()]
    started = []

    async def gen():
        started.append(True)
        yield "data: x\n\n"

    scope = {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST", "path": "/"}
    try:
        asyncio.run(EventStream(gen(), handles)(scope, receive, send))
    except OSError:
        pass
    return handles, started


def test_a_client_gone_before_the_first_byte_cancels_every_request():
    async def send(message):
        raise OSError("the client is gone")

    async def receive():
        await asyncio.sleep(10)

    handles, started = _run(send, receive)
    assert not started  # the generator never ran: only the response could clean up
    assert all(h.cancelled for h in handles)


def test_a_disconnect_while_streaming_cancels_every_request():
    async def send(message):
        await asyncio.sleep(0.05)

    async def receive():
        return {"type": "http.disconnect"}

    handles, _ = _run(send, receive)
    assert all(h.cancelled for h in handles)


def test_an_event_is_one_line_to_every_line_reader_and_decodes_to_the_same_text():
    text = "a\u2028b\x85c\u2029d\ne"  # JSON keeps the first three as they are; splitlines() breaks at them
    event = sse({"text": text})
    assert len(event.rstrip("\n").splitlines()) == 1
    assert json.loads(event[len("data: ") :]) == {"text": text}
