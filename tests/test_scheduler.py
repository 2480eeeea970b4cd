"""The service queue's decisions (gateway/scheduler.py) on plain data: no asyncio, no model, the clock passed in."""

from __future__ import annotations

import pytest

from gateway.scheduler import BatchCost, Chunk, ServiceQueue


def queue(batch_size: int = 4, max_queue_size: int = 10, slots: int = 1, batch_timeout: float = 0.0) -> ServiceQueue:
    return ServiceQueue(batch_size=batch_size, max_queue_size=max_queue_size, slots=slots, batch_timeout=batch_timeout)


def chunk(rows: int = 1, start_by: float = 10.0, finish_by: float = 20.0, later: bool = False) -> Chunk:
    return Chunk(rows=rows, start_by=start_by, finish_by=finish_by, later=later)


def measured(q: ServiceQueue, seconds_per_row: float, fixed: float = 0.0) -> ServiceQueue:
    """``q`` after calls of 1 to batch_size rows that took fixed + seconds_per_row * rows."""
    for rows in range(1, q.batch_size + 1):
        q.cost.observe(rows, fixed + seconds_per_row * rows)
    return q


def test_next_call_takes_earliest_start_by_first_up_to_batch_size_rows_when_a_slot_is_free() -> None:
    q = queue(batch_size=4)
    late, early, middle, big = chunk(1, 5.0), chunk(2, 1.0), chunk(1, 3.0), chunk(3, 4.0)
    q.add(0.0, [late, early, middle, big])
    call = q.next_call(0.0)
    assert call is not None
    assert call[1] == [early, middle]  # 2 + 1 rows; the next, 3 rows, would pass 4
    assert q.next_call(0.0) is None  # one slot, in use
    q.finished(call[0], 0.1, measured=True)
    assert q.next_call(0.1) == (2, [big, late])
    assert (q.waiting_chunks, q.waiting_rows) == (0, 0)


def test_next_call_keeps_one_call_per_slot_when_several_instances_serve() -> None:
    q = queue(batch_size=1, slots=2)
    q.add(0.0, [chunk(), chunk(), chunk()])
    assert q.next_call(0.0) is not None and q.next_call(0.0) is not None
    assert q.next_call(0.0) is None and q.waiting_chunks == 1


def test_next_call_holds_a_batch_that_is_not_full_until_batch_timeout_when_a_slot_is_free() -> None:
    q = queue(batch_size=4, batch_timeout=0.01)
    q.add(0.0, [chunk(1)])
    assert q.next_call(0.005) is None
    assert q.wake_at(0.005) == pytest.approx(0.01)
    q.add(0.006, [chunk(3)])  # now full: sent at once
    call = q.next_call(0.006)
    assert call is not None and sum(c.rows for c in call[1]) == 4


def test_next_call_sends_a_held_batch_when_its_oldest_chunk_has_waited_batch_timeout() -> None:
    q = queue(batch_size=4, batch_timeout=0.01)
    q.add(0.0, [chunk(1)])
    q.add(0.004, [chunk(1)])
    call = q.next_call(0.01)
    assert call is not None and len(call[1]) == 2


def test_expire_takes_out_waiting_chunks_past_their_start_by_and_leaves_sent_ones() -> None:
    q = queue(batch_size=1)
    sent, expiring, waiting = chunk(start_by=0.5), chunk(start_by=0.6), chunk(start_by=2.0)
    q.add(0.0, [sent, expiring, waiting])
    assert q.next_call(0.0) == (1, [sent])
    assert q.expire(0.59) == []
    assert q.expire(0.6) == [expiring]
    assert (q.waiting_chunks, q.waiting_rows) == (1, 1)
    assert q.wake_at(0.6) == 2.0


def test_remove_keeps_a_waiting_chunk_from_ever_being_sent_when_its_caller_leaves() -> None:
    q = queue(batch_size=4)
    leaving, staying = chunk(2, start_by=1.0), chunk(1, start_by=2.0)
    q.add(0.0, [leaving, staying])
    q.remove(leaving)
    assert q.next_call(0.0) == (1, [staying])
    assert q.waiting_chunks == 0


def test_admit_refuses_exactly_past_max_queue_size_when_chunks_wait() -> None:
    q = queue(batch_size=1, max_queue_size=3, slots=1)
    for _ in range(3):
        assert q.admit(0.0, [chunk()]) is None
        q.add(0.0, [chunk()])
    refusal = q.admit(0.0, [chunk()])
    assert refusal is not None and refusal.reason == "queue_full"
    assert q.admit(0.0, [chunk(), chunk()]) is not None  # a request of two chunks needs two places


def test_admit_accepts_everything_the_queue_holds_when_no_call_was_measured_yet() -> None:
    q = queue(batch_size=1, max_queue_size=100)
    q.add(0.0, [chunk() for _ in range(50)])
    assert q.admit(0.0, [chunk(start_by=0.001)]) is None


def test_admit_refuses_on_arrival_when_the_backlog_cannot_drain_before_its_start_by() -> None:
    q = measured(queue(batch_size=4, max_queue_size=100), seconds_per_row=0.01)  # a full batch: 0.04 s
    q.add(0.0, [chunk(4, start_by=1.0) for _ in range(5)])  # 5 batches ahead: 0.2 s
    assert q.admit(0.0, [chunk(1, start_by=0.25, finish_by=1.0)]) is None
    refusal = q.admit(0.0, [chunk(1, start_by=0.15, finish_by=1.0)])
    assert refusal is not None and refusal.reason == "too_late"
    assert refusal.retry_after == pytest.approx(0.2, rel=0.05)


def test_admit_refuses_on_arrival_when_the_request_cannot_finish_before_its_total_deadline() -> None:
    q = measured(queue(batch_size=4, max_queue_size=100), seconds_per_row=0.01)
    q.add(0.0, [chunk(4, start_by=1.0) for _ in range(5)])
    refusal = q.admit(0.0, [chunk(1, start_by=0.5, finish_by=0.21)])  # starts at 0.2, a batch takes 0.04
    assert refusal is not None and refusal.reason == "too_late"


def test_admit_counts_running_calls_ahead_when_every_slot_is_busy() -> None:
    q = measured(queue(batch_size=4, max_queue_size=100, slots=1), seconds_per_row=0.05)  # a batch: 0.2 s
    q.add(0.0, [chunk(4)])
    assert q.next_call(0.0) is not None
    assert q.admit(0.05, [chunk(1, start_by=0.1)]) is not None  # the running call ends at 0.2
    assert q.admit(0.05, [chunk(1, start_by=0.25)]) is None


def test_admit_lets_an_arrival_start_before_later_chunks_of_a_big_request_when_its_start_by_is_earlier() -> None:
    q = measured(queue(batch_size=4, max_queue_size=100), seconds_per_row=0.01)
    big = [chunk(4, start_by=0.5 * k + 0.1, finish_by=3.0, later=k > 0) for k in range(6)]
    q.add(0.0, big)
    # Only the first chunk (start-by 0.1) is ahead of an arrival whose start-by is 0.12: it starts at 0.04.
    assert q.admit(0.0, [chunk(1, start_by=0.12, finish_by=1.0)]) is None
    q.remove(big[0])
    call = None
    q.add(0.0, [small := chunk(1, start_by=0.12, finish_by=1.0)])
    call = q.next_call(0.0)
    assert call is not None and call[1] == [small]


def test_batch_cost_fits_a_fixed_and_a_per_row_cost_when_calls_differ_in_size() -> None:
    cost = BatchCost()
    assert cost.seconds(10) is None
    for rows in (1, 8, 2, 16, 4, 16, 1, 8) * 5:
        cost.observe(rows, 0.01 + 0.002 * rows)
    assert cost.seconds(16) == pytest.approx(0.042, rel=0.01)
    assert cost.seconds(1) == pytest.approx(0.012, rel=0.05)


def test_batch_cost_scales_the_mean_when_every_call_had_the_same_size() -> None:
    cost = BatchCost()
    for _ in range(3):
        cost.observe(4, 0.04)
    assert cost.seconds(8) == pytest.approx(0.08)


def test_admit_takes_one_batch_when_idle_even_if_the_estimate_says_it_would_be_late() -> None:
    # A stale estimate (one slow call after a Triton restart) must not refuse everything forever: nothing would be
    # sent, so nothing would correct it.
    q = measured(queue(batch_size=4, max_queue_size=100), seconds_per_row=10.0)  # a batch "takes" 40 s
    assert q.admit(0.0, [chunk(1, start_by=0.1, finish_by=0.5)]) is None
    q.add(0.0, [chunk(1, start_by=0.1, finish_by=0.5)])
    refusal = q.admit(0.0, [chunk(1, start_by=0.1, finish_by=0.5)])  # no longer idle: the estimate decides
    assert refusal is not None and refusal.reason == "too_late"
    idle = measured(queue(batch_size=4, max_queue_size=100), seconds_per_row=10.0)
    assert idle.admit(0.0, [chunk(4, start_by=0.1), chunk(4, start_by=0.1, finish_by=0.5)]) is not None  # judged
