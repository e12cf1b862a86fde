"""`BatchingStream.take_batches`: the profile agent's micro-batches (streams/transport.py).

Run on a Faust app with the memory store and `agent.test_context()`; the agent records what it
was handed and when, and handles each batch for `HANDLE_S` (longer than the window)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from streams.transport import App, BatchingStream

WINDOW_S = 1.0
HANDLE_S = 1.5


def make_app(tmp_path: Path, name: str) -> tuple[App, Any]:
    """A Faust app (memory store, no broker reached) and its raw `events` topic."""
    app = App(
        name,
        broker="kafka://127.0.0.1:1",
        store="memory://",
        datadir=str(tmp_path),
        web_enabled=False,
        autodiscover=False,
    )
    return app, app.topic("events", key_serializer="raw", value_serializer="raw")


def make_agent(tmp_path: Path, *, max_events: int) -> tuple[Any, list[dict[str, Any]]]:
    app, topic = make_app(tmp_path, "batching-test")
    seen: list[dict[str, Any]] = []

    @app.agent(topic)
    async def agent(stream: Any) -> None:
        assert isinstance(stream, BatchingStream)
        async for events in stream.take_batches(max_events, within=WINDOW_S):
            handed = asyncio.get_running_loop().time()
            seen.append(
                {
                    "values": [e.value for e in events],
                    "handed": handed,
                    "acked_when_handed": [e.message.acked for e in events],
                    "earlier_acked": [e.message.acked for b in seen for e in b["events"]],
                    "events": events,
                }
            )
            await asyncio.sleep(HANDLE_S)
            seen[-1]["handled"] = asyncio.get_running_loop().time()

    return agent, seen


async def wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "the agent did not get there"
        await asyncio.sleep(0.01)


def test_events_arriving_during_handling_form_the_next_batch_without_a_new_window(
    tmp_path: Path,
) -> None:
    agent, seen = make_agent(tmp_path, max_events=100)

    async def main() -> None:
        async with agent.test_context() as test_agent:
            await test_agent.put(b"e1", key=b"u", partition=0, wait=False)
            await wait_for(lambda: len(seen) == 1)
            # Handed out at the end of a window, and not acknowledged while it is handled.
            assert seen[0]["values"] == [b"e1"]
            assert seen[0]["acked_when_handed"] == [False]
            for value in (b"e2", b"e3"):
                await test_agent.put(value, key=b"u", partition=0, wait=False)
            await wait_for(lambda: len(seen) == 2)
            await wait_for(lambda: "handled" in seen[1])

    asyncio.run(main())
    first, second = seen
    # What arrived while the first batch was handled is the second batch, in order ...
    assert second["values"] == [b"e2", b"e3"]
    # ... handed out as soon as the first was handled (its window ran meanwhile; Faust's
    # take_events would wait a whole new window after the handling) ...
    assert second["handed"] - first["handled"] < WINDOW_S / 2
    # ... and the first batch was acknowledged before the second was handed out.
    assert second["earlier_acked"] == [True]
    assert second["acked_when_handed"] == [False, False]


def test_a_batch_holds_at_most_max_events(tmp_path: Path) -> None:
    agent, seen = make_agent(tmp_path, max_events=2)

    async def main() -> None:
        async with agent.test_context() as test_agent:
            for n in range(5):
                await test_agent.put(f"e{n}".encode(), key=b"u", partition=0, wait=False)
            await wait_for(lambda: sum(len(b["values"]) for b in seen) == 5, timeout_s=20.0)

    asyncio.run(main())
    assert [len(b["values"]) for b in seen] == [2, 2, 1]
    assert [v for b in seen for v in b["values"]] == [f"e{n}".encode() for n in range(5)]


def test_a_batch_whose_handling_fails_is_not_acknowledged(tmp_path: Path) -> None:
    app, topic = make_app(tmp_path, "batching-fail-test")
    handed: list[Any] = []

    @app.agent(topic)
    async def agent(stream: Any) -> None:
        async for events in stream.take_batches(10, within=0.05):
            handed.extend(events)
            raise RuntimeError("the handler failed")

    async def main() -> None:
        async with agent.test_context() as test_agent:
            await test_agent.put(b"e1", key=b"u", partition=0, wait=False)
            await wait_for(lambda: bool(handed))
            await asyncio.sleep(0.2)

    asyncio.run(main())
    # At least once: the failed batch's events stay unacknowledged, so they are delivered again.
    assert [e.value for e in handed] == [b"e1"]
    assert [e.message.acked for e in handed] == [False]


def test_events_removed_from_a_batch_are_not_acknowledged(tmp_path: Path) -> None:
    app, topic = make_app(tmp_path, "batching-hold-test")
    handed: list[Any] = []

    @app.agent(topic)
    async def agent(stream: Any) -> None:
        async for events in stream.take_batches(3, within=10.0):
            handed.extend(events)
            # The consumer holds back the first event (to have it delivered again).
            del events[0]

    async def main() -> None:
        async with agent.test_context() as test_agent:
            for value in (b"e1", b"e2", b"e3"):
                await test_agent.put(value, key=b"u", partition=0, wait=False)
            # Acknowledged when the consumer asks for the next batch.
            await wait_for(lambda: len(handed) == 3 and handed[-1].message.acked)
            await asyncio.sleep(0.1)

    asyncio.run(main())
    assert [e.value for e in handed] == [b"e1", b"e2", b"e3"]
    assert [e.message.acked for e in handed] == [False, True, True]
