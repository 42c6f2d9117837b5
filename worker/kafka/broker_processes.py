"""What both local brokers (tansu, Apache Kafka) share: free ports, readiness probes, log tails, start errors."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import socket
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

T = TypeVar("T")

_PROBE_TIMEOUT_MS = 2_000


class BrokerStartError(RuntimeError):
    """The broker process exited early or did not answer a Kafka metadata request in time."""


#: Where a broker's port is picked for port 0, below the kernel's range for outgoing connections.
_LISTEN_PORTS_FROM = 20_000
#: Ports this process handed out lately: a cluster's nodes each get their own.
_handed_out: collections.deque[int] = collections.deque(maxlen=256)


def free_port(host: str = "127.0.0.1", port: int = 0) -> int:
    """`port` if it is free on `host` right now; for 0, a free port below the kernel's range for
    outgoing connections (``ip_local_port_range``), where no client connection (of another test
    process, say) can take it before the broker binds it, and none handed out here lately."""
    if port:
        return _bind_check(host, port)
    first_outgoing = _first_outgoing_port()
    if first_outgoing - _LISTEN_PORTS_FROM >= 1_000:
        for candidate in random.sample(range(_LISTEN_PORTS_FROM, first_outgoing), 50):
            if candidate in _handed_out:
                continue
            with contextlib.suppress(BrokerStartError):
                _handed_out.append(_bind_check(host, candidate))
                return candidate
    bound = _bind_check(host, 0)
    _handed_out.append(bound)
    return bound


def _bind_check(host: str, port: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise BrokerStartError(f"cannot listen on {host}:{port}: {exc}") from exc
        bound: int = sock.getsockname()[1]
        return bound


def _first_outgoing_port() -> int:
    """The lowest port the kernel picks for outgoing connections (Linux; 32768 elsewhere, its default)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion on a private loop, from sync or async code alike."""
    # asyncio.run cannot nest inside a running loop; a private thread with its own loop
    # lets the synchronous API be called from async code too (e.g. a sync pytest fixture).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-broker") as pool:
        return pool.submit(asyncio.run, coro).result()


async def port_accepts(host: str, port: int) -> bool:
    """True if a TCP connection to `host:port` opens now."""
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def metadata_answers(bootstrap_servers: str, **client: Any) -> bool:
    """True if the broker answers a metadata request; `client`: aiokafka security keywords."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers, request_timeout_ms=_PROBE_TIMEOUT_MS, **client
    )
    try:
        await admin.start()
        await admin.list_topics()
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        await admin.close()
    return True


def file_tail(path: Path | None, chars: int) -> str:
    """The last ``chars`` characters of a broker's log file ("" if there is none), for error messages."""
    if path is None or not path.exists():
        return ""
    with path.open("rb") as log:
        log.seek(0, os.SEEK_END)
        log.seek(max(0, log.tell() - chars))
        return log.read().decode("utf-8", errors="replace")
