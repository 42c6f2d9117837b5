"""The parent's side of the processes under test: spawn, command, wait for events; a worker host."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from bench.corpus import spaced_sample
from bench.load import LoadClient
from bench.plan import HEARTBEAT_MS, ROOT, SESSION_TIMEOUT_MS, Context, Inputs, SweepPoint


@contextlib.asynccontextmanager
async def kafka(ctx: Context) -> AsyncIterator[None]:
    """KAFKA_BOOTSTRAP_SERVERS when set, else a fresh embedded broker for the length of the block."""
    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if servers:
        ctx.bootstrap, ctx.broker_pid = servers, None
        yield
        return
    from worker.kafka.embedded_broker import EmbeddedBroker

    async with EmbeddedBroker() as broker:
        ctx.bootstrap, ctx.broker_pid = broker.bootstrap_servers, broker.pid
        yield


@contextlib.asynccontextmanager
async def alone(ctx: Context) -> AsyncIterator[LoadClient]:
    """A fresh broker and a load client on it: whatever runs in the block has the broker to itself."""
    async with kafka(ctx), LoadClient(ctx.bootstrap, ctx.model_name) as client:
        yield client


class ChildError(RuntimeError):
    """A process under test died or did not answer in time."""


class Child:
    """A process under test: JSON commands on its stdin, JSON events on its stdout, log to a file."""

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    @classmethod
    async def spawn(cls, python: str, role: str, spec: Mapping[str, Any], log_path: Path) -> Child:
        """Start ``python -m bench.children ROLE SPEC`` with its log in ``log_path``."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                python,
                "-m",
                "bench.children",
                role,
                json.dumps(spec),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                cwd=ROOT,
                env=env,
                limit=64 * 1024 * 1024,  # result events carry every reply's timing: lines over 64 KiB
            )
        return cls(process, log_path)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    async def event(self, name: str, limit_s: float = 300.0) -> dict[str, Any]:
        """Wait for the next event called ``name``; other stdout lines are skipped."""
        assert self.process.stdout is not None
        async with asyncio.timeout(limit_s):
            while True:
                line = await self.process.stdout.readline()
                if not line:
                    tail = self.log_path.read_text(errors="replace")[-3000:]
                    raise ChildError(f"process under test exited ({self.log_path}):\n{tail}")
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict) and event.get("event") == name:
                        return event

    async def ask(self, command: Mapping[str, Any], reply: str, limit_s: float = 300.0) -> dict[str, Any]:
        """Send one command, wait for its reply event."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()
        return await self.event(reply, limit_s)

    async def close(self, limit_s: float = 60.0) -> None:
        """Close its stdin (it finishes and exits); kill it if it does not."""
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), limit_s)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


def unique_name(prefix: str) -> str:
    """A fresh name for topics, groups and logs of one bench run."""
    return f"bench-{prefix}-{uuid.uuid4().hex[:6]}"


class Host:
    """A worker process under test with its models loaded; serves Worker configurations on request."""

    def __init__(self, child: Child, buckets: Mapping[str, int], load_s: float) -> None:
        self.child = child
        self.buckets = dict(buckets)
        self.load_s = load_s

    @classmethod
    async def start(cls, ctx: Context, point: SweepPoint, with_extras: bool) -> Host:
        """Load the benched model (and the extra models) with ``point``'s engine settings."""
        folders = [ctx.model_dir]
        if with_extras and ctx.extra_models is not None:
            from worker.serving.registry import model_folders

            folders += model_folders([ctx.extra_models])
        spec = {
            "models": [str(f) for f in folders],
            "intra_op_threads": point.settings.get("intra_op_threads", 0),
            "batches_in_flight": point.settings.get("batches_in_flight", 0),
            "batch_shapes": point.settings.get("batch_shapes", "auto"),
            "overrides": {ctx.model_name: dict(point.overrides)},
            "spin": point.settings.get("intra_op_spinning", True),
        }
        ctx.say(f"loading {len(folders)} model(s)")
        child = await Child.spawn(
            sys.executable, "host", spec, ctx.out / "logs" / f"{unique_name('host')}.log"
        )
        loaded = await child.event("loaded", limit_s=900)
        return cls(child, loaded["buckets"], loaded["load_s"])

    async def serve(self, ctx: Context, point: SweepPoint) -> str:
        """Start a Worker with ``point``'s settings on fresh topics; returns its request topic."""
        prefix = unique_name("worker")
        settings = {
            "bootstrap_servers": ctx.bootstrap,
            "topic_prefix": prefix,
            "group_id": prefix,
            "session_timeout_ms": SESSION_TIMEOUT_MS,
            "heartbeat_interval_ms": HEARTBEAT_MS,
            "log_level": "WARNING",
            "provider": "cpu",
            # The load client's private reply topics (bench.load), opened as an operator would.
            "reply_to_pattern": r"bench-replies-[0-9a-f]+",
            **point.settings,
        }
        command = {"cmd": "serve", "settings": settings}
        await self.child.ask(command, "serving", limit_s=120)
        return f"{prefix}.text.requests"

    async def stop(self, topic: str) -> None:
        """Drain and stop the Worker serving ``topic``: an idle consumer still polls the broker."""
        await self.child.ask({"cmd": "stop", "prefix": topic.split(".", 1)[0]}, "stopped", limit_s=120)


@contextlib.asynccontextmanager
async def served(
    ctx: Context, host: Host, point: SweepPoint, inputs: Inputs
) -> AsyncIterator[tuple[LoadClient, str]]:
    """A fresh broker, a load client, and ``host`` serving ``point`` on it, warmed up: tansu keeps every
    record in memory and its CPU per request grows with them, so each measured run gets its own."""
    async with alone(ctx) as client:
        topic = await host.serve(ctx, point)
        await warm_up(client, topic, ctx, inputs)
        try:
            yield client, topic
        finally:
            await host.stop(topic)


async def warm_up(client: LoadClient, topic: str, ctx: Context, inputs: Inputs, count: int = 0) -> None:
    """Answers to a spread of lengths prove the consumer joined and touch every bucket."""
    sample = spaced_sample(sorted(inputs.mix, key=len), count or ctx.plan.warmup) + inputs.fixed[:4]
    run = await client.run(topic, sample, limit_s=300)
    if run.answered < len(sample):
        raise ChildError(f"warm-up on {topic}: only {run.answered} of {len(sample)} requests were answered")
