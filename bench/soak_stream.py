"""The soak stream: the request mix (stored samples and malformed kinds) and the ledger of replies."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.structs import RecordMetadata

from bench.samples import TINY_MODELS, b64, request_bytes, stored_inputs, wire_inputs
from bench.worker_processes import Reply, replies_agree
from schemas.limits import MAX_TEXT_CHARS

#: Share of the stream per model (split over its stored samples), and per malformed kind.
#: whisper-encoder is rare: its feature extractor pads every clip to 30 s (~100 ms CPU per request,
#: measured; the other five prepare in 1-2 ms).


MODEL_MIX = {
    "bert": 0.40,
    "vit": 0.15,
    "wav2vec2": 0.12,
    "whisper-encoder": 0.03,
    "videomae": 0.12,
    "clip": 0.13,
}
MALFORMED_SHARE = 0.01  # each of the five kinds: 5% in all
MODALITY = {
    "bert": "text",
    "vit": "vision",
    "wav2vec2": "audio",
    "whisper-encoder": "audio",
    "videomae": "video",
    "clip": "multimodal",
}

_ID = b"@@ID@@"  # never in base64 or in the samples' text


@dataclass(frozen=True)
class Kind:
    """One kind of request: its topic, its body (with the id left open) and the outcome it must get."""

    name: str
    modality: str
    template: bytes
    expected: str  # "ok" or an error code
    weight: float

    def body(self, request_id: str) -> bytes:
        """The request message for ``request_id``."""
        return self.template.replace(_ID, request_id.encode())


def request_kinds() -> list[Kind]:
    """The mix: each tiny model's stored samples, and five malformed kinds (one error code each)."""
    kinds = []
    for model in TINY_MODELS:
        samples = stored_inputs(model)
        for i, sample in enumerate(samples):
            template = request_bytes(_ID.decode(), model, wire_inputs(sample))
            kinds.append(
                Kind(f"{model}#{i}", MODALITY[model], template, "ok", MODEL_MIX[model] / len(samples))
            )
    id_ = _ID.decode()
    bad_image = {"image": b64(b"not an image" * 8)}
    oversize = {"text": "x" * (MAX_TEXT_CHARS + 1)}
    malformed = {  # name: (topic's modality, body, the error code it must get)
        "bad-json": ("text", b'{"id": "' + _ID + b'", "model": "bert", "inputs": {"text": ', "invalid_json"),
        "no-inputs": ("text", json.dumps({"id": id_, "model": "bert"}).encode(), "invalid_request"),
        "unknown-model": ("text", request_bytes(id_, "no-such-model", {"text": "hi"}), "unknown_model"),
        "bad-image": ("vision", request_bytes(id_, "vit", bad_image), "undecodable_input"),
        "oversize-text": ("text", request_bytes(id_, "bert", oversize), "payload_too_large"),
    }
    kinds += [Kind(name, *spec, weight=MALFORMED_SHARE) for name, spec in malformed.items()]
    return kinds


# --- what was sent and what came back --------------------------------------------------


@dataclass
class Ledger:
    """Requests sent and replies received, by request id (the correlation id of both)."""

    kinds: dict[str, Kind] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)  # wall clock, s
    first: dict[str, Reply] = field(default_factory=dict)
    outcome: dict[str, str] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    duplicates: Counter[str] = field(default_factory=Counter)
    disagreeing: list[str] = field(default_factory=list)
    strays: int = 0  # replies to no request of this run
    unreadable: int = 0  # replies that are not JSON
    produce_errors: list[str] = field(default_factory=list)
    ends: dict[TopicPartition, int] = field(default_factory=dict)
    last_reply_at: float = 0.0
    sentinels: set[str] = field(default_factory=set)

    def sending(self, request_id: str, kind: Kind) -> None:
        """Called just before a request is produced."""
        self.kinds[request_id] = kind
        self.sent_at[request_id] = time.time()

    def delivered(self, future: asyncio.Future[RecordMetadata]) -> None:
        """Producer callback: the record's offset, for the committed-offset check at the end."""
        if future.cancelled() or future.exception() is not None:
            self.produce_errors.append(repr(future.exception()))
            return
        meta = future.result()
        tp = TopicPartition(meta.topic, meta.partition)
        self.ends[tp] = max(self.ends.get(tp, 0), meta.offset + 1)

    def received(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """One record of the reply topic: a first reply, a duplicate, a sentinel or a stray."""
        headers = {k: bytes(v).decode("utf-8", "replace") for k, v in record.headers or () if v is not None}
        if "sentinel" in headers:
            self.sentinels.add(headers["sentinel"])
            return
        cid = headers.get("correlation_id")
        if cid is None or cid not in self.sent_at:
            self.strays += 1
            return
        try:
            body = json.loads(record.value or b"")
        except ValueError:
            self.unreadable += 1
            return
        key = record.key.decode() if record.key is not None else None
        reply = Reply(body.get("id"), key, cid, body)
        outcome = body["error"]["code"] if body.get("error") else "ok"
        if cid in self.first:
            self.duplicates[cid] += 1
            if not self._agree(self.first[cid], self.outcome[cid], reply, outcome):
                self.disagreeing.append(cid)
            return
        self.first[cid] = reply
        self.outcome[cid] = outcome
        self.latency_ms[cid] = record.timestamp - self.sent_at[cid] * 1000
        self.last_reply_at = time.time()

    @staticmethod
    def _agree(first: Reply, first_outcome: str, reply: Reply, outcome: str) -> bool:
        if outcome != first_outcome:
            return False
        return outcome != "ok" or replies_agree([first, reply])

    @property
    def answered(self) -> int:
        """Requests with at least one reply."""
        return len(self.first)

    def missing(self) -> list[str]:
        """Requests without a reply, in sending order."""
        return [i for i in self.sent_at if i not in self.first]
