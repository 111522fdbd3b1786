"""Driver of the Celery side of the dispatch benchmark: submits no-op tasks and waits for all
their results.

    python driver.py --jobs M [--warmup W] [--timeout-secs T]

Submits W warm-up tasks and waits for their results (the worker is up and every connection is
open), then submits M tasks with `.delay()`, one after another from this process, and waits for
all M results through the Redis result backend. Prints one JSON object on stdout:

    {"jobs": M, "succeeded": M, "seconds": S, "submit_secs": S1, "jobs_per_sec": M / S}

where S is first submit -> last result, in seconds, and S1 the part of it spent submitting.
Exits non-zero (with a message on stderr) when a result does not arrive within T seconds or a
task failed.
"""

import argparse
import json
import sys
import time

from celery.result import ResultSet

from benchapp import noop


def run(jobs, timeout_secs):
    """Submits `jobs` tasks and waits for their results; returns (seconds, submit_secs, results)."""
    start = time.perf_counter()
    results = [noop.delay() for _ in range(jobs)]
    submitted = time.perf_counter()
    values = ResultSet(results).get(timeout=timeout_secs, propagate=True)
    end = time.perf_counter()
    return end - start, submitted - start, values


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, required=True, help="tasks to time (at least 1)")
    parser.add_argument("--warmup", type=int, default=500, help="untimed tasks first (default 500)")
    parser.add_argument(
        "--timeout-secs", type=float, default=600.0, help="longest wait for the results of one batch (default 600)"
    )
    args = parser.parse_args()
    if args.jobs < 1 or args.warmup < 0:
        parser.error("--jobs must be at least 1 and --warmup at least 0")
    try:
        if args.warmup:
            run(args.warmup, args.timeout_secs)
        seconds, submit_secs, values = run(args.jobs, args.timeout_secs)
    except Exception as e:  # noqa: BLE001 - any failure ends the run with its reason
        print(f"celery driver: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if len(values) != args.jobs:
        print(f"celery driver: {len(values)} results for {args.jobs} tasks", file=sys.stderr)
        return 1
    report = {
        "jobs": args.jobs,
        "succeeded": len(values),
        "seconds": seconds,
        "submit_secs": submit_secs,
        "jobs_per_sec": args.jobs / seconds,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
