"""RabbitMQ for the mesh: the queue topology (declared here, in one place,
idempotently), a publisher with pipelined publisher confirms, and a consumer
with manual acks.

Everything runs on pika's asyncio connection inside the service's own event
loop, so acks always go out on the connection's own thread and heartbeats keep
flowing as long as the loop is not blocked (CellProfiler runs in a child
process; file work goes to threads).

Topology, with prefix P (default "cellmesh"):

    P (direct) --sites--> P.sites (quorum, delivery limit, DLX) --> workers
               --reduce-> P.reduce (quorum, delivery limit, DLX) --> reducers
    P.dlx (direct) --sites--> P.sites.dead ; --reduce--> P.reduce.dead
    P.parked: messages nobody can read, kept for people to inspect.

The work queues dead-letter at least once (quorum queues' `at-least-once`
strategy, which needs `reject-publish` overflow). There are no retry queues:
a failed site goes back to READY in the catalog with a not-before time, and
the scheduler publishes it again like any ready site. The broker only carries
tasks; whatever it loses, the catalog's deadlines find.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from services.common.backoff import Backoff
from services.common.retry import sleep_unless, wait_first
from services.common.settings import Var, positive_int

log = logging.getLogger(__name__)


AMQP_VARS = (
    Var("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F", help="RabbitMQ URL"),
    Var("QUEUE_PREFIX", "cellmesh"),
    Var("DELIVERY_LIMIT", "5", positive_int, "deliveries before a task is dead-lettered"),
)


def topology_from(values: dict[str, Any]) -> Topology:
    return Topology(
        prefix=values["QUEUE_PREFIX"],
        delivery_limit=values["DELIVERY_LIMIT"],
    )


class BrokerUnavailable(RuntimeError):
    """The broker cannot be reached or closed the connection."""


class PublishRefused(RuntimeError):
    """The broker nacked or returned a message: it was not stored."""


@dataclass(frozen=True)
class Topology:
    """Names and arguments of every exchange and queue of the mesh."""

    prefix: str = "cellmesh"
    delivery_limit: int = 5

    @property
    def exchange(self) -> str:
        return self.prefix

    @property
    def dead_exchange(self) -> str:
        return f"{self.prefix}.dlx"

    def queue(self, kind: str) -> str:
        """The work queue of a kind ("sites" or "reduce")."""
        return f"{self.prefix}.{kind}"

    def dead_queue(self, kind: str) -> str:
        return f"{self.prefix}.{kind}.dead"

    @property
    def parked_queue(self) -> str:
        return f"{self.prefix}.parked"

    KINDS: tuple[str, ...] = ("sites", "reduce")


@dataclass
class Delivery:
    """One received message. Settle it exactly once with ack/reject/requeue."""

    body: bytes
    properties: BasicProperties
    redelivered: bool
    delivery_tag: int
    _channel: Channel
    _settled: bool = field(default=False, repr=False)

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})

    @property
    def delivery_count(self) -> int:
        """How many times the broker delivered it before (quorum queues count)."""
        return int(self.headers.get("x-delivery-count", 0) or 0)

    @property
    def settled(self) -> bool:
        return self._settled

    @property
    def channel_open(self) -> bool:
        """False once the channel it came on is gone: the broker then gives
        the message to another consumer, and it can no longer be settled."""
        return bool(self._channel.is_open)

    def ack(self) -> None:
        self._settle(lambda: self._channel.basic_ack(self.delivery_tag))

    def reject(self) -> None:
        """Dead-letter it (no requeue)."""
        self._settle(lambda: self._channel.basic_nack(self.delivery_tag, requeue=False))

    def requeue(self) -> None:
        """Give it back to the queue for another consumer."""
        self._settle(lambda: self._channel.basic_nack(self.delivery_tag, requeue=True))

    def _settle(self, action: Callable[[], None]) -> None:
        if self._settled:
            return
        self._settled = True
        if self._channel.is_open:
            action()
        else:
            # The channel is gone: the broker requeues the message by itself.
            log.warning(
                "channel closed before delivery %d was settled; the broker will redeliver it",
                self.delivery_tag,
            )


SEQ_HEADER = "cellmesh-seq"

Handler = Callable[[Delivery], Coroutine[Any, Any, None]]


class AmqpConnection:
    """One connection and one channel on the running loop, with confirms.

    `await connect()` opens both, declares the topology and turns on publisher
    confirms. `publish()` returns once the broker confirmed the message;
    many publishes may wait at once (pipelined). When the connection drops,
    `closed` is set; callers reconnect with `connect()` again.
    """

    def __init__(self, url: str, topology: Topology, name: str = "cellmesh") -> None:
        self._params = pika.URLParameters(url)
        self._params.client_properties = {"connection_name": name}
        if self._params.heartbeat is None:
            self._params.heartbeat = 30
        self._params.blocked_connection_timeout = 60
        self.topology = topology
        self._conn: AsyncioConnection | None = None
        self._channel: Channel | None = None
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._next_tag = 0
        self.closed = asyncio.Event()
        self.closed.set()
        self.close_reason = ""

    @property
    def channel(self) -> Channel:
        if self._channel is None or not self._channel.is_open:
            raise BrokerUnavailable("not connected to the broker")
        return self._channel

    @property
    def is_open(self) -> bool:
        return self._channel is not None and self._channel.is_open

    async def connect(self, timeout: float = 15.0) -> None:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[AsyncioConnection] = loop.create_future()

        def on_open(conn: AsyncioConnection) -> None:
            if not opened.done():
                opened.set_result(conn)

        def on_open_error(conn: AsyncioConnection, exc: BaseException | str) -> None:
            if not opened.done():
                opened.set_exception(BrokerUnavailable(f"cannot connect to the broker: {exc}"))

        def on_close(conn: AsyncioConnection, reason: BaseException) -> None:
            self.close_reason = str(reason)
            self._fail_pending(BrokerUnavailable(f"broker connection closed: {reason}"))
            self.closed.set()

        self._conn = AsyncioConnection(
            self._params,
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=on_close,
            custom_ioloop=loop,
        )
        try:
            await asyncio.wait_for(opened, timeout)
            channel_future: asyncio.Future[Channel] = loop.create_future()
            self._conn.channel(on_open_callback=channel_future.set_result)
            channel = await asyncio.wait_for(channel_future, timeout)
        except (TimeoutError, BrokerUnavailable):
            await self.close()
            raise
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        self._pending = {}
        self._next_tag = 0
        self.closed.clear()
        await self._call(lambda cb: self.channel.confirm_delivery(self._on_confirm, callback=cb))
        await declare_topology(self, self.topology)

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        self.close_reason = str(reason)
        normal = (
            isinstance(reason, pika.exceptions.ChannelClosedByClient)
            or getattr(reason, "reply_code", 0) == 200
        )
        log.log(logging.DEBUG if normal else logging.WARNING, "broker channel closed: %s", reason)
        self._fail_pending(BrokerUnavailable(f"broker channel closed: {reason}"))
        self.closed.set()
        if self._conn is not None and self._conn.is_open:
            self._conn.close()

    def _on_return(self, channel: Channel, method: Basic.Return, props: BasicProperties, body: bytes) -> None:
        # An unroutable message is returned, then confirmed with an ack: fail
        # its future here so the caller does not take it as stored.
        seq = int((props.headers or {}).get(SEQ_HEADER, 0) or 0)
        fut = self._pending.pop(seq, None)
        reason = (
            f"the broker returned the message ({method.reply_code} {method.reply_text}): no queue is bound"
        )
        log.error("%s", reason)
        if fut is not None and not fut.done():
            fut.set_exception(PublishRefused(reason))

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = int(method.delivery_tag)
        tags = [t for t in self._pending if t <= tag] if method.multiple else [tag]
        nack = isinstance(method, Basic.Nack)
        for t in tags:
            fut = self._pending.pop(t, None)
            if fut is None or fut.done():
                continue
            if nack:
                fut.set_exception(PublishRefused("the broker refused to store the message (nack)"))
            else:
                fut.set_result(None)

    def _fail_pending(self, exc: BaseException) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    async def _call(self, start: Callable[[Callable[[Any], None]], Any], timeout: float = 30.0) -> Any:
        """Runs a callback-style channel operation and awaits its reply."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def done(frame: Any) -> None:
            if not fut.done():
                fut.set_result(frame)

        start(done)
        closed = asyncio.ensure_future(self.closed.wait())
        try:
            finished, _ = await asyncio.wait(
                {fut, closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            closed.cancel()
        if fut in finished:
            return fut.result()
        if closed in finished:
            raise BrokerUnavailable(f"broker connection closed: {self.close_reason}")
        raise BrokerUnavailable("the broker did not answer in time")

    def publish_nowait(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: dict[str, Any] | None = None,
        message_type: str = "",
    ) -> asyncio.Future[None]:
        """Publishes a persistent message; the future resolves when the broker
        confirms it. Publish many, then gather: confirms are pipelined."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        channel = self.channel
        self._next_tag += 1
        props = BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            content_type="application/x-protobuf",
            type=message_type or None,
            headers={**(headers or {}), SEQ_HEADER: self._next_tag},
        )
        self._pending[self._next_tag] = fut
        channel.basic_publish(exchange, routing_key, body, props, mandatory=True)
        return fut

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: dict[str, Any] | None = None,
        message_type: str = "",
    ) -> None:
        await asyncio.wait_for(self.publish_nowait(exchange, routing_key, body, headers, message_type), 30)

    async def queue_depth(self, queue: str) -> int:
        return (await self.queue_stats(queue))[0]

    async def queue_stats(self, queue: str) -> tuple[int, int]:
        """(messages ready for delivery, consumers) of a queue."""
        frame = await self._call(lambda cb: self.channel.queue_declare(queue, passive=True, callback=cb))
        return int(frame.method.message_count), int(frame.method.consumer_count)

    async def purge_queue(self, queue: str) -> int:
        """Drops every ready message of a queue; returns how many."""
        frame = await self._call(lambda cb: self.channel.queue_purge(queue, callback=cb))
        return int(frame.method.message_count)

    async def delete_queue(self, queue: str) -> None:
        await self._call(lambda cb: self.channel.queue_delete(queue, callback=cb))

    async def delete_exchange(self, exchange: str) -> None:
        await self._call(lambda cb: self.channel.exchange_delete(exchange, callback=cb))

    async def consume(self, queue: str, prefetch: int, handler: Handler) -> str:
        """Starts delivering messages of `queue` to `handler` (one task each).
        Returns the consumer tag, for `cancel`."""
        await self._call(lambda cb: self.channel.basic_qos(prefetch_count=prefetch, callback=cb))
        loop = asyncio.get_running_loop()
        channel = self.channel

        def on_message(ch: Channel, method: Basic.Deliver, props: BasicProperties, body: bytes) -> None:
            delivery = Delivery(body, props, bool(method.redelivered), int(method.delivery_tag), ch)
            task = loop.create_task(handler(delivery))
            _consumer_tasks.add(task)
            task.add_done_callback(_consumer_tasks.discard)

        tag: str = channel.basic_consume(queue, on_message, auto_ack=False)
        return tag

    async def cancel(self, consumer_tag: str) -> None:
        if self.is_open:
            with contextlib.suppress(BrokerUnavailable):
                await self._call(lambda cb: self.channel.basic_cancel(consumer_tag, callback=cb), timeout=10)

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed and not self._conn.is_closing:
            self._conn.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closed.wait(), 10)
        self.closed.set()


_consumer_tasks: set[asyncio.Task[None]] = set()


async def declare_topology(conn: AmqpConnection, topology: Topology) -> None:
    """Declares every exchange, queue and binding; safe to run again."""
    t = topology

    async def exchange(name: str) -> None:
        await conn._call(
            lambda cb: conn.channel.exchange_declare(name, exchange_type="direct", durable=True, callback=cb)
        )

    async def queue(name: str, arguments: dict[str, Any]) -> None:
        await conn._call(
            lambda cb: conn.channel.queue_declare(name, durable=True, arguments=arguments, callback=cb)
        )

    async def bind(queue_name: str, exchange_name: str, key: str) -> None:
        await conn._call(
            lambda cb: conn.channel.queue_bind(queue_name, exchange_name, routing_key=key, callback=cb)
        )

    for name in (t.exchange, t.dead_exchange):
        await exchange(name)
    await queue(t.parked_queue, {"x-queue-type": "quorum"})
    for kind in Topology.KINDS:
        await queue(
            t.queue(kind),
            {
                "x-queue-type": "quorum",
                "x-delivery-limit": t.delivery_limit,
                "x-dead-letter-exchange": t.dead_exchange,
                "x-dead-letter-routing-key": kind,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
        await bind(t.queue(kind), t.exchange, kind)
        await queue(t.dead_queue(kind), {"x-queue-type": "quorum"})
        await bind(t.dead_queue(kind), t.dead_exchange, kind)


async def connect_with_backoff(
    url: str,
    topology: Topology,
    name: str,
    stop: asyncio.Event | None = None,
    first_delay: float = 0.5,
    max_delay: float = 15.0,
) -> AmqpConnection:
    """Connects, retrying with exponential backoff and full jitter until it
    works or `stop` is set."""
    delays = Backoff(first_delay, max_delay).schedule()
    while True:
        conn = AmqpConnection(url, topology, name)
        try:
            await conn.connect()
            return conn
        except (BrokerUnavailable, TimeoutError, OSError) as exc:
            if stop is not None and stop.is_set():
                raise BrokerUnavailable("stopped while connecting to the broker") from exc
            delay = delays.next()
            log.warning("broker not reachable (%s); retrying in %.1f s", exc, delay)
            await sleep_unless(stop, delay)


async def consume_until_stopped(
    url: str,
    topology: Topology,
    name: str,
    queue: str,
    prefetch: int,
    handler: Handler,
    stop: asyncio.Event,
    on_stop: Callable[[AmqpConnection, str], Coroutine[Any, Any, None]] | None = None,
    on_connect: Callable[[AmqpConnection | None], None] | None = None,
) -> None:
    """Consumes `queue` until `stop` is set, reconnecting with backoff whenever
    the broker goes away. `on_connect` hears of each new connection (and of
    None when it is gone), for handlers that publish on it. On stop,
    `on_stop(conn, consumer_tag)` runs (e.g. to drain work in progress), else
    the consumer is cancelled."""
    while not stop.is_set():
        try:
            conn = await connect_with_backoff(url, topology, name, stop)
        except BrokerUnavailable:
            return
        if on_connect is not None:
            on_connect(conn)
        try:
            tag = await conn.consume(queue, prefetch, handler)
            log.info("%s: consuming %s (prefetch %d)", name, queue, prefetch)
            await wait_first(stop, conn.closed)
            if stop.is_set():
                if on_stop is not None:
                    await on_stop(conn, tag)
                else:
                    await conn.cancel(tag)
        except BrokerUnavailable as exc:
            log.warning("%s lost the broker: %s; reconnecting", name, exc)
        finally:
            await conn.close()
            if on_connect is not None:
                on_connect(None)


def settle_all_pending(futures: Sequence[asyncio.Future[None]]) -> tuple[int, list[BaseException]]:
    """Counts confirmed futures and collects the failures (after gather)."""
    ok = 0
    errors: list[BaseException] = []
    for fut in futures:
        if fut.cancelled():
            errors.append(asyncio.CancelledError())
        elif fut.exception() is not None:
            errors.append(fut.exception())  # type: ignore[arg-type]
        else:
            ok += 1
    return ok, errors
