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
import base64
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from worker.embedded_broker import (
    BrokerStartError,
    file_tail,
    free_port,
    metadata_answers,
    port_accepts,
    run_blocking,
)

KAFKA_VERSION = "4.4.0"
DEFAULT_LIBS = Path.home() / ".cache" / "onnx-worker" / f"kafka-{KAFKA_VERSION}"

#: Settings docker-compose.yml sets too (tests/test_apache_broker.py compares them): production
#: practice, so the tests meet what users run.
SHARED_SETTINGS: Mapping[str, str] = {
    "num.partitions": "4",
    # No topic exists because a client named it (README "Where replies go").
    "auto.create.topics.enable": "false",
    "group.initial.rebalance.delay.ms": "0",
}

#: Only for the fixtures: the tests use 3 s sessions (Kafka's floor is 6 s), a dead broker is
#: fenced after 3 s instead of 9, and a 2-core machine runs several JVMs.
TEST_SETTINGS: Mapping[str, str] = {
    "group.min.session.timeout.ms": "1000",
    "broker.session.timeout.ms": "3000",
    "broker.heartbeat.interval.ms": "500",
    "offsets.topic.num.partitions": "8",
    "num.network.threads": "2",
    "num.io.threads": "2",
    "background.threads": "2",
    "log.cleaner.threads": "1",
}

ADMIN_USER = "admin"
_POLL_S = 0.1
_LOG_TAIL_CHARS = 3_000
_LOG4J = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
logger.kafka.name = kafka
logger.kafka.level = warn
logger.org.name = org.apache.kafka
logger.org.level = warn
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = info
"""


def replication_settings(nodes: int) -> dict[str, str]:
    """Replication of internal and new topics for a cluster of `nodes`: all copies, two in sync."""
    in_sync = str(min(2, nodes))
    return {
        "default.replication.factor": str(nodes),
        "min.insync.replicas": in_sync,
        "offsets.topic.replication.factor": str(nodes),
        "transaction.state.log.replication.factor": str(nodes),
        "transaction.state.log.min.isr": in_sync,
        "share.coordinator.state.topic.replication.factor": str(nodes),
        "share.coordinator.state.topic.min.isr": in_sync,
    }


def libs_dir() -> Path:
    """Where the jars are: ``KAFKA_LIBS`` or the default cache; BrokerStartError if absent."""
    libs = Path(os.environ.get("KAFKA_LIBS") or DEFAULT_LIBS)
    if not (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file():
        raise BrokerStartError(
            f"Apache Kafka {KAFKA_VERSION} jars not found in {libs}: run `make kafka` "
            "(mvn dependency:copy-dependencies on kafka/pom.xml) or set KAFKA_LIBS"
        )
    return libs


@dataclass
class _Node:
    node_id: int
    port: int
    controller_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def properties(self) -> Path:
        return self.directory / "server.properties"

    @property
    def log_path(self) -> Path:
        return self.directory / "kafka.log"


def random_cluster_id() -> str:
    """A KRaft cluster id drawn as Kafka's own ``Uuid.randomUuid`` draws one: never one that starts with "-",
    which kafka-storage's argument parser takes for an option (one start in 64 failed: "argument
    --cluster-id/-t: expected one argument")."""
    while (drawn := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")).startswith("-"):
        pass
    return drawn


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
        self._nodes: dict[int, _Node] = {}

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
            await self._format(libs)
            for node in self._nodes.values():
                self._spawn(node, libs)
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
            self._reap(node, max(0.1, deadline - time.monotonic()))
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
        await asyncio.to_thread(self._reap, node, timeout_s)

    async def restart_node(self, node_id: int) -> None:
        """Start a stopped or killed node again on its ports and data; returns once it answers."""
        node = self._nodes[node_id]
        if node.process is not None and node.process.poll() is None:
            raise RuntimeError(f"node {node_id} is still running")
        self._spawn(node, libs_dir())
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
            node = _Node(node_id, free_port(self.host, wanted), free_port(self.host), directory)
            self._nodes[node_id] = node
        for node in self._nodes.values():
            node.properties.write_text(self._server_properties(node))
            (node.directory / "log4j2.properties").write_text(_LOG4J)

    def _server_properties(self, node: _Node) -> str:
        voters = ",".join(f"{n.node_id}@{self.host}:{n.controller_port}" for n in self._nodes.values())
        protocol = "SASL_PLAINTEXT" if self.secured else "PLAINTEXT"
        props: dict[str, str] = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": f"CLIENT://{self.host}:{node.port},CONTROLLER://{self.host}:{node.controller_port}",
            "advertised.listeners": f"CLIENT://{self.host}:{self._advertised_port or node.port}",
            "listener.security.protocol.map": f"CLIENT:{protocol},CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "CLIENT",
            "log.dirs": str(node.directory / "data"),
            **SHARED_SETTINGS,
            **TEST_SETTINGS,
            **replication_settings(self.node_count),
        }
        if self._advertised_port is not None:
            # Clients go through the advertised port (a proxy that cuts them off); the broker's own
            # traffic (its transaction coordinator writing markers, say) keeps a listener of its own,
            # so a cut isolates the clients, not the broker from itself.
            internal = free_port(self.host)
            props |= {
                "listeners": f"{props['listeners']},INTERNAL://{self.host}:{internal}",
                "advertised.listeners": f"{props['advertised.listeners']},INTERNAL://{self.host}:{internal}",
                "listener.security.protocol.map": f"{props['listener.security.protocol.map']},INTERNAL:{protocol}",
                "inter.broker.listener.name": "INTERNAL",
            }
        if self.secured:
            users = {ADMIN_USER: self._admin_password, **self._users}
            accounts = " ".join(f'user_{name}="{password}"' for name, password in users.items())
            props |= {
                "sasl.enabled.mechanisms": "PLAIN",
                "sasl.mechanism.inter.broker.protocol": "PLAIN",
                "listener.name.client.plain.sasl.jaas.config": (
                    "org.apache.kafka.common.security.plain.PlainLoginModule required "
                    f'username="{ADMIN_USER}" password="{self._admin_password}" {accounts};'
                ),
                "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                # The controller listener is loopback plaintext: brokers and controllers reach each
                # other there as ANONYMOUS, which must be allowed the cluster's own requests.
                "super.users": f"User:{ADMIN_USER};User:ANONYMOUS",
                "allow.everyone.if.no.acl.found": "false",
            }
        props |= self._settings
        return "".join(f"{key}={value}\n" for key, value in props.items())

    def _java(self, node: _Node, libs: Path, *args: str) -> list[str]:
        java = str(Path(os.environ["JAVA_HOME"]) / "bin" / "java") if "JAVA_HOME" in os.environ else "java"
        return [
            java,
            f"-Xmx{self._heap_mb}m",
            "-Xms64m",
            # One GC thread: several JVMs share two cores in the tests.
            "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={node.directory / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",
            *args,
        ]

    async def _format(self, libs: Path) -> None:
        cluster_id = random_cluster_id()

        async def format_one(node: _Node) -> None:
            command = self._java(
                node, libs, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(node.properties)
            )
            process = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            output, _ = await process.communicate()
            if process.returncode != 0:
                raise BrokerStartError(f"formatting node {node.node_id} failed:\n{output.decode()[-2000:]}")

        await asyncio.gather(*(format_one(node) for node in self._nodes.values()))

    def _spawn(self, node: _Node, libs: Path) -> None:
        with node.log_path.open("ab") as log:
            # A file, never a pipe nobody reads (it would fill and stall the JVM).
            node.process = subprocess.Popen(
                self._java(node, libs, "kafka.Kafka", str(node.properties)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own session: Ctrl+C in a terminal reaches the worker first, which drains while
                # the broker is still up.
                start_new_session=True,
            )

    async def _wait_node(self, node: _Node, deadline: float) -> None:
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
        while await self._registered_brokers() < self.node_count:
            if time.monotonic() > deadline:
                raise BrokerStartError(f"only some of the {self.node_count} Kafka nodes registered in time")
            await asyncio.sleep(_POLL_S)

    async def _registered_brokers(self) -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers, **self.admin_client_config())
        try:
            await admin.start()
            return len((await admin.describe_cluster())["brokers"])
        except (KafkaError, OSError, TimeoutError):
            return 0
        finally:
            await admin.close()

    @staticmethod
    def _reap(node: _Node, timeout_s: float) -> None:
        if node.process is None:
            return
        try:
            node.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()


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
