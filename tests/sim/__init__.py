"""A deterministic simulation of the worker's Kafka path, FoundationDB / VOPR style.

The real ``worker.app.Worker`` (fetching, flow, offsets, delivery, batching, answers, the tiny bert
on ONNX Runtime) runs unchanged over fakes of the aiokafka surfaces it uses, on one thread and a
virtual clock; one seed draws the workload and every fault, so a seed replays exactly.

- ``clock``: the virtual-time event loop, the executor on it, the worker modules' ``time``;
- ``cluster``: the fake cluster, consumer (group, positions, batches) and producer/admin client;
- ``faults``: the seeded plan (records, outages, rebalances, crashes, SIGTERMs, a second worker, refusals,
  stalls) and scheduler;
- ``invariants``: I1-I5 and the issue-23 defect each violation shows;
- ``run``: one seed end to end; ``python -m tests.sim`` runs many (see ``__main__``).
"""
