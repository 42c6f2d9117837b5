"""A small asyncio client: send requests to the workers over Kafka and await their replies.

Replies are matched by request id (the `correlation_id` header, else the body's `id`). Each
client reads its own reply topic, by default a fresh `<prefix>.replies.<uuid>` that it
creates in start() and deletes in stop().
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import RecordMetadata

from schemas.requests import Modality
from schemas.topics import DEFAULT_PREFIX, private_reply_topic, requests_topic
from worker.kafka.topics import create_topics, delete_topics, track_topic

log = logging.getLogger(__name__)

Inputs = Mapping[str, Any] | Sequence[Mapping[str, Any]]
"""Named inputs of a modality (e.g. `{"text": ...}`) or a list of OIP tensors."""
T = TypeVar("T")


class ClientClosed(RuntimeError):
    """The client stopped (or its reply reader failed) before the reply arrived."""


class InferenceClient:
    """Produces requests to `<prefix>.<modality>.requests` and resolves replies by request id."""

    def __init__(
        self,
        bootstrap_servers: str,
        topic_prefix: str = DEFAULT_PREFIX,
        reply_topic: str | None = None,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic_prefix = topic_prefix
        self._owns_reply_topic = reply_topic is None
        self.reply_topic = reply_topic or private_reply_topic(topic_prefix)
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._failure: BaseException | None = None
        #: set by stop(): what a request still waits on in the producer ends with ClientClosed
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        """Create the reply topic, connect, and start the reply reader task."""
        if self._producer is not None:
            raise RuntimeError("InferenceClient is already started")
        # The reply topic must exist before the consumer subscribes, or it waits for
        # the next metadata refresh to see it.
        await create_topics(self.bootstrap_servers, [self.reply_topic])
        # Idempotence off: the embedded broker (tansu) refuses InitProducerId.
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            acks="all",
            enable_idempotence=False,
            linger_ms=5,
        )
        # No group: a private topic needs no coordination, and skips a group join
        # (about session_timeout_ms / 2 on tansu). "earliest" so that no reply written
        # before the first fetch is missed.
        consumer = AIOKafkaConsumer(
            self.reply_topic,
            bootstrap_servers=self.bootstrap_servers,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await producer.start()
        try:
            await consumer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer, self._consumer = producer, consumer
        self._failure = None
        self._stopped.clear()
        self._reader = asyncio.create_task(self._read_replies(consumer), name="reply-reader")

    async def stop(self) -> None:
        """Cancel the reader, fail waiting requests with ClientClosed, disconnect."""
        self._stopped.set()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        self._fail_pending(ClientClosed("InferenceClient stopped"))
        producer, consumer = self._producer, self._consumer
        self._producer = self._consumer = None
        if consumer is not None:
            await consumer.stop()
        if producer is not None:
            await producer.stop()
        if self._owns_reply_topic and producer is not None:
            try:
                await delete_topics(self.bootstrap_servers, [self.reply_topic])
            except Exception:
                # Only housekeeping: a leftover private topic does no harm.
                log.warning("could not delete reply topic %s", self.reply_topic, exc_info=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def request(
        self,
        modality: Modality | str,
        model: str,
        inputs: Inputs,
        parameters: Mapping[str, Any] | None = None,
        id: str | None = None,
        # A parameter, not asyncio.timeout(): the reply wait alone is bounded, and the
        # pending entry is dropped with it.
        timeout: float = 30.0,  # noqa: ASYNC109
        deadline_ms: int | None = None,
    ) -> dict[str, Any]:
        """Send one request and return its reply (a result or an error object, as a dict).

        Raises TimeoutError after `timeout` seconds without a reply.
        """
        request_id, delivered, reply = await self._send(modality, model, inputs, parameters, id, deadline_ms)
        try:
            await self._unless_stopped(delivered)
            return await asyncio.wait_for(reply, timeout)
        finally:
            self._pending.pop(request_id, None)

    async def send_many(
        self,
        modality: Modality | str,
        model: str,
        inputs: Iterable[Inputs],
        parameters: Mapping[str, Any] | None = None,
        timeout: float = 30.0,  # noqa: ASYNC109
    ) -> list[dict[str, Any]]:
        """Send one request per inputs item at once; replies come back in input order.

        Raises TimeoutError if any reply is missing after `timeout` seconds.
        """
        sent: list[tuple[str, asyncio.Future[RecordMetadata], asyncio.Future[dict[str, Any]]]] = []
        try:
            for item in inputs:
                sent.append(await self._send(modality, model, item, parameters))
            await self._unless_stopped(asyncio.gather(*(delivered for _, delivered, _ in sent)))
            return await asyncio.wait_for(asyncio.gather(*(reply for *_, reply in sent)), timeout)
        finally:
            for request_id, *_ in sent:
                self._pending.pop(request_id, None)

    async def _send(
        self,
        modality: Modality | str,
        model: str,
        inputs: Inputs,
        parameters: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        deadline_ms: int | None = None,
    ) -> tuple[str, asyncio.Future[RecordMetadata], asyncio.Future[dict[str, Any]]]:
        """Queue one request in the producer; returns its id, delivery and reply futures."""
        if self._producer is None:
            raise ClientClosed("InferenceClient is not started")
        if self._failure is not None:
            raise ClientClosed("the reply reader failed") from self._failure
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._pending:
            raise ValueError(f"a request with id {request_id!r} is already waiting")
        body: dict[str, Any] = {"id": request_id, "model": model, "inputs": inputs}
        if parameters is not None:
            body["parameters"] = parameters
        if deadline_ms is not None:
            body["deadline_ms"] = deadline_ms
        # Registered before producing: a fast worker may answer before send() returns.
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = reply
        topic = requests_topic(modality, self.topic_prefix)
        try:
            track_topic(self._producer, topic)
            delivered = await self._unless_stopped(
                self._producer.send(
                    topic,
                    json.dumps(body, separators=(",", ":")).encode(),
                    key=request_id.encode(),
                    headers=[
                        ("correlation_id", request_id.encode()),
                        ("reply_to", self.reply_topic.encode()),
                        ("content-type", b"application/json"),
                    ],
                )
            )
        except BaseException:
            self._pending.pop(request_id, None)
            raise
        return request_id, delivered, reply

    async def _unless_stopped(self, step: Awaitable[T]) -> T:
        """``step``, or ClientClosed once stop() is called: aiokafka leaves what a stopped producer was waiting
        for (a topic's metadata, a record's delivery) pending for good, and the request with it."""
        task = asyncio.ensure_future(step)
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            done, _ = await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            stopped.cancel()
        if task not in done:
            task.cancel()
            raise ClientClosed("InferenceClient stopped")
        return task.result()

    async def _read_replies(self, consumer: AIOKafkaConsumer) -> None:
        try:
            async for record in consumer:
                self._resolve(record.value, dict(record.headers).get("correlation_id"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("reply reader failed; failing %d waiting requests", len(self._pending))
            self._failure = exc
            self._fail_pending(ClientClosed(f"the reply reader failed: {exc!r}"))

    def _resolve(self, value: bytes | None, correlation_id: bytes | None) -> None:
        try:
            reply = json.loads(value or b"")
        except ValueError:
            log.warning("ignoring a reply that is not JSON on %s", self.reply_topic)
            return
        if not isinstance(reply, dict):
            log.warning("ignoring a reply that is not a JSON object on %s", self.reply_topic)
            return
        # The header wins: an error reply to an unparseable request has a null id.
        request_id = correlation_id.decode(errors="replace") if correlation_id else reply.get("id")
        future = self._pending.get(request_id) if isinstance(request_id, str) else None
        # Replies to other clients on a shared topic, and duplicates after a worker
        # crash (same id, already answered), land here and are dropped.
        if future is not None and not future.done():
            future.set_result(reply)

    def _fail_pending(self, error: BaseException) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
