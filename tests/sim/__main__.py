"""Run the simulation from the command line (from the repository root, HF_HUB_OFFLINE=1).

    python -m tests.sim --seeds 0:2000 --workers 2   # a range of seeds, a per-defect summary
    python -m tests.sim --minutes 30 --workers 2     # random seeds for 30 minutes (the long run)
    python -m tests.sim --seed 42 --trace            # replay one seed: its plan, trace and violations
    python -m tests.sim --seeds 0:2000 --workers 2 --delivery exactly-once   # the worker's transactions

Every violation is printed as it comes, with the command that replays its seed (each defect the
simulation found is fixed: none is expected). Exit status 1 when any invariant was violated.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter, defaultdict

from tests.sim.invariants import DEFECTS
from tests.sim.run import DELIVERIES, SeedResult, replay, run_seed, timed

#: Seeds per round of the timed run (--minutes): the clock is read between rounds.
ROUND = 200


def summary(results: list[SeedResult], wall_s: float) -> str:
    """Seeds per defect, duplicates per cause, and the time per 1000 seeds."""
    per: dict[str, list[int]] = defaultdict(list)
    dups: Counter[str] = Counter()
    for r in results:
        for d in sorted(r.defects):
            per[d].append(r.seed)
        dups.update(r.duplicates)
    lines = [
        f"{len(results)} seeds in {wall_s:.1f} s ({wall_s / max(1, len(results)) * 1000:.0f} s per 1000), "
        f"{sum(r.virtual_s for r in results) / 3600:.1f} virtual hours",
        f"duplicate answers per cause: {dict(sorted(dups.items()))}",
    ]
    for defect in sorted(per, key=lambda d: (len(d), d)):
        seeds = per[defect]
        lines.append(f"{defect} ({DEFECTS.get(defect, '?')}): {len(seeds)} seeds, e.g. {seeds[:12]}")
    if not per:
        lines.append("no invariant violated")
    return "\n".join(lines)


def _report(results: list[SeedResult]) -> None:
    for r in results:
        for v in r.violations:
            print(f"seed {r.seed}: {v}\n    replay: {replay(r.seed, r.delivery)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--seed", type=int, help="replay one seed")
    what.add_argument("--seeds", help="a range of seeds, FIRST:LAST (LAST excluded)")
    what.add_argument("--minutes", type=float, help="random seeds for this long")
    parser.add_argument("--trace", action="store_true", help="with --seed: print the whole trace")
    parser.add_argument("--workers", type=int, default=1, help="processes running seeds (default 1)")
    parser.add_argument(
        "--delivery",
        choices=DELIVERIES,
        default=DELIVERIES[0],
        help="the worker's delivery mode (WORKER_DELIVERY)",
    )
    args = parser.parse_args(argv)
    if args.seed is not None:
        result = run_seed(args.seed, keep_trace=args.trace, delivery=args.delivery)
        print(f"seed {result.seed}: {result.plan}")
        for line in result.trace:
            print(line)
        print(
            f"trace digest {result.digest}, {result.virtual_s:.1f} virtual s, duplicates {result.duplicates}"
        )
        for v in result.violations:
            print(f"  {v}")
        return 1 if result.violations else 0
    if args.seeds:
        first, last = (int(x) for x in args.seeds.split(":"))
        results, wall_s = timed(range(first, last), args.workers, args.delivery)
        _report(results)
    else:
        began = time.perf_counter()
        rng = random.Random()
        results = []
        try:
            while time.perf_counter() - began < args.minutes * 60:
                chunk, _ = timed([rng.randrange(2**32) for _ in range(ROUND)], args.workers, args.delivery)
                _report(chunk)
                results += chunk
                seen = Counter(d for r in results for d in r.defects)
                print(
                    f"{len(results)} seeds, {time.perf_counter() - began:.0f} s: {dict(sorted(seen.items()))}",
                    flush=True,
                )
        except KeyboardInterrupt:
            print("interrupted: the summary of the seeds run so far")
        wall_s = time.perf_counter() - began
    print(summary(results, wall_s))
    return 1 if any(r.violations for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
