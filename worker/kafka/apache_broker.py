"""Apache Kafka 4 brokers (KRaft) run from the Maven Central jars: for the tests and for people.

`make kafka` copies org.apache.kafka:kafka_2.13 and its dependencies (kafka/pom.xml) into
``KAFKA_LIBS`` (default ``~/.cache/onnx-worker/kafka-4.4.0``). Each node is one JVM
(``java -cp 'libs/*' kafka.Kafka server.properties``) acting as broker and KRaft controller, in a
temporary log directory formatted by ``kafka.tools.StorageTool``. One node, or three with
replication 3 and ``min.insync.replicas`` 2; with ``users`` the client listener asks SASL/PLAIN and
the StandardAuthorizer refuses whatever no ACL allows (``admin`` is the super user).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

from worker.kafka.apache_config import (
    ADMIN_USER,
    KAFKA_VERSION,
    LOG4J,
    libs_dir,
    server_properties,
)
from worker.kafka.apache_nodes import Node, format_nodes, reap_node, registered_brokers, spawn_node
from worker.kafka.broker_processes import (
    BrokerStartError,
    file_tail,
    free_port,
    metadata_answers,
    port_accepts,
    run_blocking,
)

_POLL_S = 0.1
_LOG_TAIL_CHARS = 3_000


class ApacheKafka:
    """A KRaft cluster of `nodes` JVMs on loopback; a context manager (sync or async) or start()/stop().

    `users`: SASL/PLAIN user names and passwords; with them, StandardAuthorizer is on and only ACLs
    (or the super user ``admin``, see ``admin_client_config()``) allow anything.
    """

    def __init__(
        self,
        nodes: int = 1,
        *,
        port: int | None = None,
        advertised_port: int | None = None,
        users: Mapping[str, str] | None = None,
        settings: Mapping[str, str] | None = None,
        heap_mb: int = 512,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 120.0,
    ) -> None:
        """`port`: the first node's client port (default: free ones); `advertised_port`: the port its
        metadata names instead (a proxy's, forwarding to `port` before start; one node only);
        `settings` override the rest."""
        if advertised_port is not None and nodes != 1:
            raise ValueError("advertised_port is for a single node")
        if nodes < 1:
            raise ValueError("nodes must be at least 1")
        self.host = host
        self.node_count = nodes
        self._requested_port = port
        self._advertised_port = advertised_port
        self._users = dict(users or {})
        self._admin_password = secrets.token_hex(8)
        self._settings = dict(settings or {})
        self._heap_mb = heap_mb
        self._startup_timeout_s = startup_timeout_s
        self._directory: Path | None = None
        self._nodes: dict[int, Node] = {}

    # -- what callers read ------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """Every node's ``host:port``, comma separated; only valid while started."""
        if not self._nodes:
            raise RuntimeError("ApacheKafka is not started")
        return ",".join(f"{self.host}:{node.port}" for node in self._nodes.values())

    @property
    def secured(self) -> bool:
        """True when clients must authenticate (SASL/PLAIN) and ACLs decide."""
        return bool(self._users)

    @property
    def directory(self) -> Path | None:
        """The temporary folder of every node's data, config and log while started (removed by stop())."""
        return self._directory

    @property
    def node_ids(self) -> list[int]:
        """The nodes' ids (1..nodes)."""
        return list(self._nodes)

    def pid(self, node_id: int) -> int | None:
        """The JVM's process id of a running node, else None."""
        process = self._nodes[node_id].process
        return process.pid if process is not None and process.poll() is None else None

    def node_address(self, node_id: int) -> str:
        """``host:port`` of one node's client listener."""
        return f"{self.host}:{self._nodes[node_id].port}"

    def client_config(self, user: str | None = None) -> dict[str, Any]:
        """aiokafka keyword arguments to connect as `user` (one of ``users``, or ``admin``)."""
        if not self.secured:
            return {}
        password = self._admin_password if user == ADMIN_USER else self._users[user or ""]
        return {
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "PLAIN",
            "sasl_plain_username": user,
            "sasl_plain_password": password,
        }

    def admin_client_config(self) -> dict[str, Any]:
        """aiokafka keyword arguments of the super user (creates topics, grants ACLs)."""
        return self.client_config(ADMIN_USER)

    def log_tail(self, node_id: int = 1, chars: int = _LOG_TAIL_CHARS) -> str:
        """The last `chars` characters of a node's log, for error messages."""
        return file_tail(self._nodes[node_id].log_path if node_id in self._nodes else None, chars)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> str:
        """Format and start every node, block until all answer metadata; returns bootstrap_servers."""
        return run_blocking(self.astart())

    async def astart(self) -> str:
        """start() without blocking the event loop."""
        if self._nodes:
            raise RuntimeError("ApacheKafka is already started")
        libs = libs_dir()
        self._directory = Path(tempfile.mkdtemp(prefix="apache-kafka-"))
        try:
            self._plan_nodes()
            await format_nodes(self._nodes, libs, self._heap_mb)
            for node in self._nodes.values():
                spawn_node(node, libs, self._heap_mb)
            await self._wait_cluster()
        except BaseException:
            await self.astop()
            raise
        return self.bootstrap_servers

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop every node (SIGTERM, SIGKILL after `timeout_s`) and remove the log directories."""
        for node in self._nodes.values():
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        deadline = time.monotonic() + timeout_s
        for node in self._nodes.values():
            reap_node(node, max(0.1, deadline - time.monotonic()))
        self._nodes = {}
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    async def astop(self, timeout_s: float = 15.0) -> None:
        """Async stop(): waits for the processes in a thread."""
        await asyncio.to_thread(self.stop, timeout_s)

    def kill(self, node_id: int) -> None:
        """SIGKILL one node (a crash: nothing flushed, no controlled shutdown) and reap it."""
        node = self._nodes[node_id]
        if node.process is not None:
            node.process.kill()
            node.process.wait()

    async def stop_node(self, node_id: int, timeout_s: float = 30.0) -> None:
        """Stop one node the polite way (SIGTERM: controlled shutdown moves its leaderships away)."""
        node = self._nodes[node_id]
        if node.process is not None and node.process.poll() is None:
            node.process.terminate()
        await asyncio.to_thread(reap_node, node, timeout_s)

    async def restart_node(self, node_id: int) -> None:
        """Start a stopped or killed node again on its ports and data; returns once it answers."""
        node = self._nodes[node_id]
        if node.process is not None and node.process.poll() is None:
            raise RuntimeError(f"node {node_id} is still running")
        spawn_node(node, libs_dir(), self._heap_mb)
        await self._wait_node(node, time.monotonic() + self._startup_timeout_s)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await self.astart()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.astop()

    # -- internals --------------------------------------------------------------------

    def _plan_nodes(self) -> None:
        assert self._directory is not None
        for node_id in range(1, self.node_count + 1):
            wanted = self._requested_port if node_id == 1 and self._requested_port else 0
            directory = self._directory / f"node-{node_id}"
            (directory / "data").mkdir(parents=True)
            node = Node(node_id, free_port(self.host, wanted), free_port(self.host), directory)
            self._nodes[node_id] = node
        for node in self._nodes.values():
            node.properties.write_text(
                server_properties(
                    node,
                    self._nodes,
                    self.host,
                    advertised_port=self._advertised_port,
                    users=self._users,
                    admin_password=self._admin_password,
                    settings=self._settings,
                )
            )
            (node.directory / "log4j2.properties").write_text(LOG4J)

    async def _wait_node(self, node: Node, deadline: float) -> None:
        assert node.process is not None
        address = f"{self.host}:{node.port}"
        while True:
            if node.process.poll() is not None:
                raise BrokerStartError(
                    f"Kafka node {node.node_id} exited with code {node.process.returncode} before it "
                    f"was ready; log tail:\n{self.log_tail(node.node_id)}"
                )
            if await port_accepts(self.host, node.port) and await metadata_answers(
                address, **self.admin_client_config()
            ):
                return
            if time.monotonic() > deadline:
                raise BrokerStartError(
                    f"Kafka node {node.node_id} did not answer metadata on {address} within "
                    f"{self._startup_timeout_s:g} s; log tail:\n{self.log_tail(node.node_id)}"
                )
            await asyncio.sleep(_POLL_S)

    async def _wait_cluster(self) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        for node in self._nodes.values():
            await self._wait_node(node, deadline)
        # Every broker registered: before that, topics get fewer replicas than asked for.
        while await registered_brokers(self.bootstrap_servers, self.admin_client_config()) < self.node_count:
            if time.monotonic() > deadline:
                raise BrokerStartError(f"only some of the {self.node_count} Kafka nodes registered in time")
            await asyncio.sleep(_POLL_S)


def serve_forever(nodes: int = 1, port: int | None = None) -> None:
    """Run Apache Kafka in the foreground, print its bootstrap address, stop on SIGINT/SIGTERM."""
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ApacheKafka(nodes, port=port) as kafka:
            print(f"Apache Kafka {KAFKA_VERSION} ({nodes} KRaft node(s), temporary storage) ready")
            print(f"export KAFKA_BOOTSTRAP_SERVERS={kafka.bootstrap_servers}", flush=True)
            while not stop.wait(timeout=0.5):
                for node_id in kafka.node_ids:
                    if kafka.pid(node_id) is None:
                        raise BrokerStartError(f"Kafka node {node_id} exited:\n{kafka.log_tail(node_id)}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
