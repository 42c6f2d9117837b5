"""TEMPORARY (issue 26, part 1): one Apache Kafka 4.4 KRaft node from the Maven Central jars.

To be replaced at merge by the shared Apache Kafka fixture of issue 25 (worker/apache_broker.py on
branch i25-apache); it exists only so the exactly-once tests can run before that lands. The jars
come from ``KAFKA_LIBS`` or ``~/.cache/onnx-worker/kafka-4.4.0``, copied there by
``mvn dependency:copy-dependencies`` (kafka_2.13 4.4.0 plus a log4j2 binding) when absent.

``python -m tests.apache_kafka_once`` runs a node in the foreground and prints its bootstrap address
(for bench/exactly_once.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

KAFKA_VERSION = "4.4.0"
LIBS = Path(os.environ.get("KAFKA_LIBS") or Path.home() / ".cache" / "onnx-worker" / f"kafka-{KAFKA_VERSION}")

_POM = f"""<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>
<groupId>local</groupId><artifactId>kafka-libs</artifactId><version>1</version><packaging>pom</packaging>
<dependencies>
<dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{KAFKA_VERSION}</version></dependency>
<dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>2.0.17</version></dependency>
<dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>2.26.1</version></dependency>
<dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>2.26.1</version></dependency>
</dependencies></project>
"""

_LOG4J = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = out
"""


def _libs() -> Path:
    if not (LIBS / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file():
        with tempfile.TemporaryDirectory() as build:
            (Path(build) / "pom.xml").write_text(_POM)
            subprocess.run(
                ["mvn", "-q", "dependency:copy-dependencies", f"-DoutputDirectory={LIBS}"],
                cwd=build,
                check=True,
            )
    return LIBS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def apache_kafka(
    *, port: int | None = None, advertised_port: int | None = None, startup_timeout_s: float = 120.0
) -> Iterator[str]:
    """One KRaft node (broker and controller, -Xmx512m) on free ports; yields its bootstrap address.

    ``advertised_port``: the port clients are told to connect to (a TcpProxy's, to cut them off);
    the node reaches itself (transaction markers) on a listener of its own.
    """
    libs = _libs()
    port = port or _free_port()
    controller, internal = _free_port(), _free_port()
    advertised = advertised_port or port
    with tempfile.TemporaryDirectory(prefix="apache-kafka-") as directory:
        root = Path(directory)
        properties = root / "server.properties"
        properties.write_text(
            textwrap.dedent(f"""\
            process.roles=broker,controller
            node.id=1
            controller.quorum.bootstrap.servers=127.0.0.1:{controller}
            listeners=CLIENT://127.0.0.1:{port},INTERNAL://127.0.0.1:{internal},CONTROLLER://127.0.0.1:{controller}
            advertised.listeners=CLIENT://127.0.0.1:{advertised},INTERNAL://127.0.0.1:{internal}
            listener.security.protocol.map=CLIENT:PLAINTEXT,INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT
            inter.broker.listener.name=INTERNAL
            controller.listener.names=CONTROLLER
            log.dirs={root / "data"}
            num.partitions=4
            auto.create.topics.enable=false
            group.initial.rebalance.delay.ms=0
            group.min.session.timeout.ms=1000
            offsets.topic.replication.factor=1
            offsets.topic.num.partitions=8
            transaction.state.log.replication.factor=1
            transaction.state.log.min.isr=1
            transaction.state.log.num.partitions=8
            share.coordinator.state.topic.replication.factor=1
            num.network.threads=2
            num.io.threads=2
            background.threads=2
            log.cleaner.threads=1
            """)
        )
        (root / "log4j2.properties").write_text(_LOG4J)
        java = [
            "java",
            "-Xmx512m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            f"-Dlog4j2.configurationFile={root / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",
        ]
        cluster_id = uuid.uuid4().hex[:22]
        subprocess.run(
            [
                *java,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(properties),
                "--standalone",
            ],
            check=True,
            capture_output=True,
        )
        log_path = root / "kafka.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*java, "kafka.Kafka", str(properties)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + startup_timeout_s
            while not _accepts(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Apache Kafka did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.2)
            yield f"127.0.0.1:{advertised}"
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


if __name__ == "__main__":
    with apache_kafka() as bootstrap:
        print(bootstrap, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
