"""The consumer runtime: one loop per (queue, handler), written once for every broker.

What it does with each delivery:

1. Read it through the :mod:`intake <taskstream.intake>` (size and depth limits, decode, claim-check): what
   cannot be read goes to the dead-letter queue with the reason, an unreachable payload store is retried, and
   the loop keeps going. After the final ack a payload is deleted; a dead-lettered message keeps it.
2. Run the handler under the concurrency limit, with a visibility heartbeat (``extend``) when the broker
   hides unacked messages for a limited time and the handler runs longer than a third of it.
3. Ack only after the handler returned, which includes awaiting anything it published. An ack the broker
   refuses (unreachable, queue deleted) is logged and kept in ``stats.last_error``; the message comes back.
4. On an exception: requeue with the :class:`~taskstream.intake.RetryPolicy` while ``attempt < max_attempts``;
   then dead-letter. ``Reject`` and validation errors dead-letter at once; ``Retry`` requeues with the delay it
   carries. Any exception at all settles the delivery: none is left holding a slot.

Shutdown (:meth:`Consumer.stop`): stop pulling, let in-flight handlers finish for ``shutdown_grace``
seconds, requeue what is still running, return prefetched messages, close. Nothing is lost or run twice
by a clean stop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from taskstream.brokers.base import Broker, Delivery, Subscription
from taskstream.bundles import BROKEN_BUNDLE, BUNDLE_KIND, Part, is_bundle, unpack
from taskstream.errors import MessageError, Reject, Retry
from taskstream.intake import DeadLetterHook, Intake, IntakeStats, Opened, RetryPolicy
from taskstream.messages import Envelope
from taskstream.payloads.claimcheck import ClaimCheck, PayloadRef
from taskstream.settings import DEFAULT_CONCURRENCY, DEFAULT_MAX_ATTEMPTS, DEFAULT_PREFETCH

__all__ = ["Consumer", "ConsumerConfig", "ConsumerStats", "Handler", "Message"]

log = logging.getLogger("taskstream.consumer")


class ConsumerConfig(BaseModel):
    """How one consumer pulls, runs, retries and dead-letters.

    Attributes:
        prefetch: most unacked messages held at once.
        concurrency: most handlers running at once.
        max_attempts: deliveries before a failing message is dead-lettered.
        retry_delay: first retry delay in seconds; doubles (``retry_backoff``) up to ``retry_max_delay``.
        dead_letter: dead-letter queue name; ``None`` means the broker's ``dead_letter_name(queue)``
            (``<queue>.dlq``; ``<queue>-poison`` on Azure Storage Queues).
        shutdown_grace: seconds in-flight handlers may finish on stop before they are requeued.
        handler_timeout: seconds a handler may run; ``None`` for no limit. A timed-out handler counts as failed.
    """

    model_config = ConfigDict(frozen=True)

    prefetch: int = DEFAULT_PREFETCH
    concurrency: int = DEFAULT_CONCURRENCY
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_delay: float = 0.5
    retry_backoff: float = 2.0
    retry_max_delay: float = 60.0
    dead_letter: str | None = None
    shutdown_grace: float = 30.0
    handler_timeout: float | None = None

    @property
    def retry_policy(self) -> RetryPolicy:
        """The backoff these settings describe."""
        return RetryPolicy(initial=self.retry_delay, factor=self.retry_backoff, max_delay=self.retry_max_delay)

    def backoff(self, attempt: int) -> float:
        """Delay before the retry that follows delivery number ``attempt``."""
        return self.retry_policy.delay(attempt)


@dataclass(slots=True)
class Message:
    """What a runtime handler receives: the decoded envelope and the delivery it came in."""

    envelope: Envelope
    delivery: Delivery


Handler = Callable[[Message], Awaitable[None]]


ConsumerStats = IntakeStats
"""Counters of one consumer (the intake's counters), for tests, health checks and progress output."""


class Consumer:
    """Runs ``handler`` for every message of ``queue`` on ``broker``.

    Example:
        >>> async def example(broker):
        ...     async def handle(message: Message) -> None:
        ...         print(message.envelope.body)
        ...     consumer = Consumer(broker, "readings", handle)
        ...     await consumer.start()
        ...     await consumer.stop()
    """

    def __init__(
        self,
        broker: Broker,
        queue: str,
        handler: Handler,
        config: ConsumerConfig | None = None,
        claim_check: ClaimCheck | None = None,
        *,
        on_dead_letter: DeadLetterHook | None = None,
        max_message_bytes: int | None = None,
    ) -> None:
        self.broker = broker
        self.claim_check = claim_check if claim_check is not None else ClaimCheck.from_settings()
        self.queue = queue
        self.handler = handler
        self.config = config or ConsumerConfig()
        self.stats = ConsumerStats()
        self.intake = Intake(
            broker,
            queue,
            claim_check=self.claim_check,
            dead_letter_queue=self.config.dead_letter,
            max_attempts=self.config.max_attempts,
            retry=self.config.retry_policy,
            max_bytes=max_message_bytes,
            stats=self.stats,
            on_dead_letter=on_dead_letter,
        )
        self.dead_letter_queue = self.intake.dead_letter_queue
        self._slots = asyncio.Semaphore(self.config.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscription: Subscription | None = None
        self._pull_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self.failure: str | None = None
        """Why the consumer stopped by itself (the broker failed for good), or ``None``."""

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._pull_task is not None and not self._stopped.is_set()

    async def start(self) -> None:
        """Declare the queue and its dead-letter queue, then start pulling in the background."""
        await self.broker.declare(self.dead_letter_queue)
        await self.broker.declare(self.queue, dead_letter=self.dead_letter_queue)
        self._subscription = self.broker.consume(self.queue, prefetch=self.config.prefetch)
        self._stopped.clear()
        self._pull_task = asyncio.create_task(self._pull(self._subscription), name=f"consume:{self.queue}")

    async def run(self) -> None:
        """Start, then wait until :meth:`stop` is called (from another task or a signal handler)."""
        await self.start()
        await self._stopped.wait()

    async def wait_stopped(self) -> None:
        """Wait until the consumer has stopped."""
        await self._stopped.wait()

    async def _pull(self, subscription: Subscription) -> None:
        try:
            while True:
                # Take a handler slot first, then the delivery: a delivery taken while every slot is busy
                # would wait without a visibility heartbeat, and on visibility-timeout brokers come back.
                await self._slots.acquire()
                try:
                    delivery = await subscription.__anext__()
                except BaseException:
                    self._slots.release()
                    raise
                self.stats.received += 1
                self.stats.in_flight += 1
                task = asyncio.create_task(self._process(delivery))
                self._tasks.add(task)
                task.add_done_callback(self._done)
        except StopAsyncIteration:
            if not self._stopping:
                self._fail("the broker ended the subscription")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the broker failed for good: stop loudly, not silently
            self._fail(f"{type(exc).__name__}: {exc}")

    def _fail(self, reason: str) -> None:
        log.error("consumer on %r stopped by itself: %s", self.queue, reason)
        self.stats.last_error = self.failure = reason
        self._stopped.set()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.stats.in_flight -= 1
        self._slots.release()

    async def stop(self, grace: float | None = None) -> None:
        """Stop pulling, let in-flight work finish for ``grace`` seconds, requeue the rest, close."""
        grace = self.config.shutdown_grace if grace is None else grace
        self._stopping = True
        if self._pull_task is not None:
            self._pull_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pull_task
        if self._tasks:
            _, still_running = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in still_running:
                task.cancel()
            if still_running:
                await asyncio.wait(still_running)
        if self._subscription is not None:
            await self._subscription.close()
        self._stopped.set()

    async def _process(self, delivery: Delivery) -> None:
        heartbeat = self._start_heartbeat(delivery)  # loading a large payload can take a while too
        try:
            # A bundle gets no span of its own: each of its messages gets one, in its sender's trace.
            bundled = delivery.headers.get("ts_kind") == BUNDLE_KIND
            with contextlib.nullcontext() if bundled else self.intake.tracing.process(self.queue, delivery):
                opened = await self.intake.open(delivery)
                if opened is not None and is_bundle(opened.envelope):
                    await self._run_bundle(opened)
                elif opened is not None:
                    await self._run(opened)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug on this path must not leave the delivery unsettled
            log.exception("consumer on %r failed on message %s", self.queue, delivery.message_id)
            await self.intake.retry_or_dead_letter(delivery, f"{type(exc).__name__}: {exc}")
        finally:
            if heartbeat is not None:
                heartbeat.cancel()

    async def _run_bundle(self, opened: Opened) -> None:
        """Run each message of a bundle (:mod:`taskstream.bundles`) as a delivery of its own.

        The bundle keeps its handler slot and takes more while free ones remain; with none free, its next
        message waits for one of its own to finish. A bundle never waits for a slot held elsewhere (the pull
        loop holds one while it waits for a delivery that a full prefetch window may never bring), so
        ``concurrency=1`` runs a bundle's messages one after another instead of stalling.
        """
        assert opened.envelope is not None
        parts = unpack(opened.delivery, opened.envelope)
        if not parts:
            await self.intake.dead_letter(opened.delivery, BROKEN_BUNDLE)
            return
        self.stats.received += len(parts) - 1  # counted as messages, as they were sent: the bundle was one
        for _ in parts[1:]:
            self.intake.metrics.received()
        held = 1  # slots this bundle holds: its own, and those it took while they were free
        waiting = collections.deque(parts)
        running: set[asyncio.Task[None]] = set()
        try:
            while waiting:
                if len(running) >= held:
                    if not self._slots.locked():
                        await self._slots.acquire()  # free: taken at once
                        held += 1
                    else:
                        finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                        running -= finished
                        continue
                running.add(asyncio.create_task(self._run_part(waiting.popleft())))
            await asyncio.gather(*running)
        except asyncio.CancelledError:  # stopping: messages not started go back untouched, running ones too
            for task in running:
                task.cancel()
            for part in waiting:
                await self.intake.requeue_on_stop(part.delivery)
            await asyncio.gather(*running, return_exceptions=True)
            raise
        finally:
            for _ in range(held - 1):
                self._slots.release()
        if opened.ref is not None and opened.delivery.settled and not parts[0].delivery.bundle_requeued:
            await self.claim_check.release(opened.ref)

    async def _run_part(self, part: Part) -> None:
        delivery = part.delivery
        self.stats.in_flight += 1
        try:
            with self.intake.tracing.process(self.queue, delivery):
                if part.envelope is None:
                    await self.intake.dead_letter(delivery, part.refused)
                else:
                    await self._run(Opened(delivery, None, None, part.envelope))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug on this path must not leave the part (and its bundle) unsettled
            log.exception("consumer on %r failed on message %s", self.queue, delivery.message_id)
            await self.intake.retry_or_dead_letter(delivery, f"{type(exc).__name__}: {exc}")
        finally:
            self.stats.in_flight -= 1

    async def _run(self, opened: Opened) -> None:
        delivery, envelope, intake = opened.delivery, opened.envelope, self.intake
        assert envelope is not None
        started = intake.metrics.timer()
        try:
            if self.config.handler_timeout is not None:
                await asyncio.wait_for(self.handler(Message(envelope, delivery)), self.config.handler_timeout)
            else:
                await self.handler(Message(envelope, delivery))
        except asyncio.CancelledError:
            await intake.requeue_on_stop(delivery)  # stopped while running: back for another consumer
            raise
        except Reject as exc:
            await intake.dead_letter(delivery, f"rejected by handler: {exc.reason}", envelope=envelope)
        except Retry as exc:
            await intake.retry_or_dead_letter(delivery, exc.reason, exc.delay, envelope=envelope)
        except MessageError as exc:
            await intake.dead_letter(delivery, f"{type(exc).__name__}: {exc}", envelope=envelope)
        except TimeoutError:
            reason = f"handler timed out after {self.config.handler_timeout} s"
            await intake.retry_or_dead_letter(delivery, reason, envelope=envelope)
        except Exception as exc:
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            log.warning(
                "handler for %r failed on attempt %d of %s: %s: %s",
                self.queue,
                delivery.attempt,
                self.config.max_attempts,
                type(exc).__name__,
                exc,
            )
            await intake.retry_or_dead_letter(delivery, f"{type(exc).__name__}: {exc}", envelope=envelope)
        else:
            intake.metrics.handler_time(started)
            await self._ack(delivery, opened.ref)

    async def _ack(self, delivery: Delivery, ref: PayloadRef | None) -> None:
        try:
            await delivery.ack()
        except Exception as exc:
            # The broker is unreachable or the queue is gone: the message comes back (at-least-once) and
            # its payload must stay for that redelivery. Never let this escape the task unhandled.
            self.stats.ack_failed += 1
            self.stats.last_error = f"ack failed: {type(exc).__name__}: {exc}"
            log.warning(
                "could not ack message %s on %r (%s: %s); the broker will deliver it again",
                delivery.message_id,
                self.queue,
                type(exc).__name__,
                exc,
            )
            return
        self.stats.acked += 1
        self.intake.metrics.handled()
        if ref is not None:
            await self.claim_check.release(ref)

    def _start_heartbeat(self, delivery: Delivery) -> asyncio.Task[None] | None:
        timeout = self.broker.capabilities.visibility_timeout
        if timeout is None:
            return None
        return asyncio.create_task(self._heartbeat(delivery, timeout))

    async def _heartbeat(self, delivery: Delivery, timeout: float) -> None:
        interval = max(0.05, timeout / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await delivery.extend(timeout)
            except Exception as exc:
                log.warning("visibility heartbeat on %r failed: %s", self.queue, exc)
