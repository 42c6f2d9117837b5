"""The JVMs of an Apache Kafka cluster: a node's folder and ports, its command line, format, start, reap;
and how many of them registered."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from worker.kafka.broker_processes import BrokerStartError


@dataclass
class Node:
    """One KRaft node of a cluster: its ports, its folder (data, config, log) and its JVM once started."""

    node_id: int
    port: int
    controller_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def properties(self) -> Path:
        """Its server.properties."""
        return self.directory / "server.properties"

    @property
    def log_path(self) -> Path:
        """Its JVM's log (stdout and stderr)."""
        return self.directory / "kafka.log"


def random_cluster_id() -> str:
    """A KRaft cluster id drawn as Kafka's own ``Uuid.randomUuid`` draws one: never one that starts with "-",
    which kafka-storage's argument parser takes for an option (one start in 64 failed: "argument
    --cluster-id/-t: expected one argument")."""
    while (drawn := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")).startswith("-"):
        pass
    return drawn


def java_command(node: Node, libs: Path, heap_mb: int, *args: str) -> list[str]:
    """The JVM command line that runs ``args`` (a main class and its arguments) for ``node``."""
    java = str(Path(os.environ["JAVA_HOME"]) / "bin" / "java") if "JAVA_HOME" in os.environ else "java"
    return [
        java,
        f"-Xmx{heap_mb}m",
        "-Xms64m",
        # One GC thread: several JVMs share two cores in the tests.
        "-XX:+UseSerialGC",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={node.directory / 'log4j2.properties'}",
        "-cp",
        f"{libs}/*",
        *args,
    ]


async def format_nodes(nodes: Mapping[int, Node], libs: Path, heap_mb: int) -> None:
    """Format every node's storage for one new cluster (kafka.tools.StorageTool), all at once."""
    cluster_id = random_cluster_id()

    async def format_one(node: Node) -> None:
        command = java_command(
            node,
            libs,
            heap_mb,
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(node.properties),
        )
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await process.communicate()
        if process.returncode != 0:
            raise BrokerStartError(f"formatting node {node.node_id} failed:\n{output.decode()[-2000:]}")

    await asyncio.gather(*(format_one(node) for node in nodes.values()))


def spawn_node(node: Node, libs: Path, heap_mb: int) -> None:
    """Start the node's JVM (kafka.Kafka), its output going to its log file."""
    with node.log_path.open("ab") as log:
        # A file, never a pipe nobody reads (it would fill and stall the JVM).
        node.process = subprocess.Popen(
            java_command(node, libs, heap_mb, "kafka.Kafka", str(node.properties)),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Own session: Ctrl+C in a terminal reaches the worker first, which drains while
            # the broker is still up.
            start_new_session=True,
        )


def reap_node(node: Node, timeout_s: float) -> None:
    """Wait for the node's JVM to exit, killing it after ``timeout_s``."""
    if node.process is None:
        return
    try:
        node.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        node.process.kill()
        node.process.wait()


async def registered_brokers(bootstrap_servers: str, client_config: Mapping[str, Any]) -> int:
    """How many brokers the cluster's metadata lists (0 while it does not answer)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **client_config)
    try:
        await admin.start()
        return len((await admin.describe_cluster())["brokers"])
    except (KafkaError, OSError, TimeoutError):
        return 0
    finally:
        await admin.close()
