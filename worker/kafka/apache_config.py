"""How an Apache Kafka node is configured: its jars, the shared and test settings, its server.properties."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from worker.kafka.apache_nodes import Node
from worker.kafka.broker_processes import BrokerStartError, free_port

KAFKA_VERSION = "4.4.0"
DEFAULT_LIBS = Path.home() / ".cache" / "onnx-worker" / f"kafka-{KAFKA_VERSION}"

#: Settings docker-compose.yml sets too (tests/test_apache_broker.py compares them): production
#: practice, so the tests meet what users run.
SHARED_SETTINGS: Mapping[str, str] = {
    "num.partitions": "4",
    # No topic exists because a client named it (docs/reference.md, "Where replies go").
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
LOG4J = """\
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


def server_properties(
    node: Node,
    nodes: Mapping[int, Node],
    host: str,
    *,
    advertised_port: int | None,
    users: Mapping[str, str],
    admin_password: str,
    settings: Mapping[str, str],
) -> str:
    """One node's server.properties: KRaft roles and listeners, the shared, test and replication
    settings, SASL/PLAIN with ACLs when there are ``users``, then ``settings`` over all of them."""
    voters = ",".join(f"{n.node_id}@{host}:{n.controller_port}" for n in nodes.values())
    protocol = "SASL_PLAINTEXT" if users else "PLAINTEXT"
    props: dict[str, str] = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "controller.quorum.voters": voters,
        "listeners": f"CLIENT://{host}:{node.port},CONTROLLER://{host}:{node.controller_port}",
        "advertised.listeners": f"CLIENT://{host}:{advertised_port or node.port}",
        "listener.security.protocol.map": f"CLIENT:{protocol},CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "CLIENT",
        "log.dirs": str(node.directory / "data"),
        **SHARED_SETTINGS,
        **TEST_SETTINGS,
        **replication_settings(len(nodes)),
    }
    if advertised_port is not None:
        # Clients go through the advertised port (a proxy that cuts them off); the broker's own
        # traffic (its transaction coordinator writing markers, say) keeps a listener of its own,
        # so a cut isolates the clients, not the broker from itself.
        internal = free_port(host)
        props |= {
            "listeners": f"{props['listeners']},INTERNAL://{host}:{internal}",
            "advertised.listeners": f"{props['advertised.listeners']},INTERNAL://{host}:{internal}",
            "listener.security.protocol.map": f"{props['listener.security.protocol.map']},INTERNAL:{protocol}",
            "inter.broker.listener.name": "INTERNAL",
        }
    if users:
        users = {ADMIN_USER: admin_password, **users}
        accounts = " ".join(f'user_{name}="{password}"' for name, password in users.items())
        props |= {
            "sasl.enabled.mechanisms": "PLAIN",
            "sasl.mechanism.inter.broker.protocol": "PLAIN",
            "listener.name.client.plain.sasl.jaas.config": (
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                f'username="{ADMIN_USER}" password="{admin_password}" {accounts};'
            ),
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            # The controller listener is loopback plaintext: brokers and controllers reach each
            # other there as ANONYMOUS, which must be allowed the cluster's own requests.
            "super.users": f"User:{ADMIN_USER};User:ANONYMOUS",
            "allow.everyone.if.no.acl.found": "false",
        }
    props |= settings
    return "".join(f"{key}={value}\n" for key, value in props.items())
