"""Dead letters on every broker: a bug dead-letters, list shows why, replay after the fix is handled."""

from __future__ import annotations

import orjson
import pytest

from taskstream.errors import QueueNotFound
from taskstream.observe import (
    DeadLetterNotFound,
    get_dead_letter,
    inspect_queues,
    list_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
    replay_headers,
)
from tests.observe.conftest import Orders

MALFORMED = b"\xffnot json at all"


async def dead_letter_three(orders: Orders) -> None:
    """Orders 1 (fine), 13 and 14 (the bug) and one malformed message; wait until three are dead letters."""
    for number in (1, 13, 14):
        await orders.app.publish(orders.queue, {"n": number})
    await orders.inspect.publish(orders.queue, MALFORMED, message_id="malformed-1")
    await orders.wait_handled(1)
    await orders.wait_dlq_depth(3)


async def test_a_bug_dead_letters_list_shows_it_replay_after_the_fix_is_handled(orders: Orders) -> None:
    await dead_letter_three(orders)

    letters = await list_dead_letters(orders.inspect, orders.queue)
    assert len(letters) == 3
    by_reason = {letter.message_id: letter for letter in letters}
    bugs = [letter for letter in letters if letter.reason and "KeyError" in letter.reason]
    assert len(bugs) == 2
    assert all(letter.attempts == 2 for letter in bugs)
    assert all(letter.original_queue == orders.queue for letter in letters)
    assert all(letter.dead_lettered_at is not None for letter in letters)
    assert "no price for order" in (bugs[0].reason or "")
    malformed = by_reason["malformed-1"]
    assert malformed.body == MALFORMED and malformed.size == len(MALFORMED)
    assert malformed.reason is not None and "KeyError" not in malformed.reason
    await orders.wait_dlq_depth(3)  # reading left every dead letter where it was

    orders.fixed = True
    result = await replay_dead_letters(orders.inspect, orders.queue, reason_contains="keyerror")
    assert sorted(letter.message_id for letter in result.replayed) == sorted(b.message_id for b in bugs)
    assert result.failed == [] and result.kept == 1
    await orders.wait_handled(13, 14)
    await orders.wait_dlq_depth(1)
    replayed = orders.headers[13]
    assert replayed["x-replayed"] == 1
    assert not {"x-death-reason", "x-original-queue", "x-attempts", "x-dead-lettered-at"} & set(replayed)
    assert sorted(orders.handled) == [1, 13, 14]  # each exactly once here: one consumer, no crash

    left = await list_dead_letters(orders.inspect, orders.queue)
    assert [letter.message_id for letter in left] == ["malformed-1"]


async def test_dry_run_changes_nothing_and_filters_select(orders: Orders) -> None:
    await dead_letter_three(orders)
    letters = await list_dead_letters(orders.inspect, orders.queue)
    bug_ids = sorted(letter.message_id for letter in letters if "KeyError" in (letter.reason or ""))
    number = {
        letter.message_id: orjson.loads(letter.body)["body"]["n"] for letter in letters if letter.message_id in bug_ids
    }

    dry = await replay_dead_letters(orders.inspect, orders.queue, reason_contains="KeyError", dry_run=True)
    assert dry.dry_run and sorted(letter.message_id for letter in dry.replayed) == bug_ids
    await orders.wait_dlq_depth(3)
    assert orders.handled == [1]

    orders.fixed = True
    by_id = await replay_dead_letters(orders.inspect, orders.queue, ids=[bug_ids[0]])
    assert [letter.message_id for letter in by_id.replayed] == [bug_ids[0]]
    assert by_id.kept == 2
    await orders.wait_dlq_depth(2)
    await orders.wait_handled(number[bug_ids[0]])
    assert number[bug_ids[1]] not in orders.handled

    limited = await replay_dead_letters(orders.inspect, orders.queue, reason_contains="KeyError", limit=1)
    assert [letter.message_id for letter in limited.replayed] == [bug_ids[1]]
    await orders.wait_handled(13, 14)
    await orders.wait_dlq_depth(1)

    nothing = await replay_dead_letters(orders.inspect, orders.queue, reason_contains="no such reason")
    assert nothing.replayed == [] and nothing.kept == 1


async def test_show_gives_headers_and_original_bytes_and_purge_empties(orders: Orders) -> None:
    await dead_letter_three(orders)
    malformed = await get_dead_letter(orders.inspect, orders.queue, "malformed-1")
    details = malformed.details()
    assert details["body_encoding"] == "base64"
    assert malformed.body == MALFORMED
    assert details["headers"]["x-original-queue"] == orders.queue
    letters = await list_dead_letters(orders.inspect, orders.queue)
    bug = next(letter for letter in letters if "KeyError" in (letter.reason or ""))
    shown = (await get_dead_letter(orders.inspect, orders.queue, bug.message_id)).details()
    assert shown["body_encoding"] == "json" and '"n":' in shown["body"]
    with pytest.raises(DeadLetterNotFound, match="no-such-id"):
        await get_dead_letter(orders.inspect, orders.queue, "no-such-id")
    await orders.wait_dlq_depth(3)

    [info] = await inspect_queues(orders.inspect, [orders.queue])
    assert info.dead_letter == orders.dead_letter and info.dead_letter_depth == 3 and info.error is None

    assert await purge_dead_letters(orders.inspect, orders.queue) == 3
    await orders.wait_dlq_depth(0)
    assert await list_dead_letters(orders.inspect, orders.queue) == []


@pytest.mark.memory
async def test_a_missing_dead_letter_queue_says_so() -> None:
    from taskstream.brokers.memory import MemoryBroker

    async with MemoryBroker() as broker:
        with pytest.raises(QueueNotFound, match=r"orders\.dlq.*does not exist"):
            await list_dead_letters(broker, "orders")
        await broker.declare("orders")
        present, absent = await inspect_queues(broker, ["orders", "absent"])
    assert (present.depth, present.dead_letter, present.dead_letter_depth, present.error) == (
        0,
        "orders.dlq",
        None,
        None,
    )
    assert absent.depth is None and absent.error is not None and "absent does not exist" in absent.error


def test_replay_headers_drop_the_death_and_count_replays() -> None:
    headers = {
        "x-death-reason": "KeyError",
        "x-original-queue": "q",
        "x-original-message-id": "m",
        "x-attempts": 3,
        "x-dead-lettered-at": 1.0,
        "x-death": [{"queue": "q"}],
        "x-replayed": 1,
        "traceparent": "00-abc",
        "correlation_id": "c1",
    }
    assert replay_headers(headers) == {"x-replayed": 2, "traceparent": "00-abc", "correlation_id": "c1"}
