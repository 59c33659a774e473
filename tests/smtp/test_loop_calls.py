"""Calls from the writer threads to the event loop (smtp.server.LoopCalls): all of them run, in
order, and calls that come together share one wake-up of the loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from smtp.server import LoopCalls


def test_calls_posted_together_run_in_order_after_one_wake_up() -> None:
    async def main() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        wake_ups = 0
        real = loop.call_soon_threadsafe

        def counted(*args: object) -> asyncio.Handle:
            nonlocal wake_ups
            wake_ups += 1
            return real(*args)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        calls = LoopCalls(loop)
        ran: list[int] = []
        done = asyncio.Event()

        def post_all() -> None:  # a writer thread finishing a batch
            for number in range(100):
                calls.post(ran.append, number)
            calls.post(done.set)

        thread = threading.Thread(target=post_all)
        thread.start()
        thread.join()  # the loop is held up meanwhile: nothing has run yet
        assert ran == []
        await done.wait()
        return ran, wake_ups

    ran, wake_ups = asyncio.run(main())

    assert ran == list(range(100))
    assert wake_ups == 1


def test_a_future_carries_the_result_or_the_error_to_the_loop() -> None:
    async def main() -> None:
        calls = LoopCalls(asyncio.get_running_loop())
        ok: concurrent.futures.Future[int] = concurrent.futures.Future()
        failed: concurrent.futures.Future[int] = concurrent.futures.Future()
        waiting_ok, waiting_failed = calls.future(ok), calls.future(failed)
        threading.Thread(target=ok.set_result, args=(7,)).start()
        threading.Thread(target=failed.set_exception, args=(OSError("disk"),)).start()

        assert await waiting_ok == 7
        with pytest.raises(OSError, match="disk"):
            await waiting_failed

    asyncio.run(main())


def test_giving_up_on_the_loop_cancels_the_work_not_yet_taken_up() -> None:
    async def main() -> concurrent.futures.Future[int]:
        calls = LoopCalls(asyncio.get_running_loop())
        work: concurrent.futures.Future[int] = concurrent.futures.Future()
        calls.future(work).cancel()
        return work

    assert asyncio.run(main()).cancelled()


def test_a_call_posted_after_the_loop_closed_is_dropped() -> None:
    loop = asyncio.new_event_loop()
    calls = LoopCalls(loop)
    loop.close()

    calls.post(print, "never")  # no error: nobody is waiting any more
