"""The Celery side of the dispatch benchmark (tests/src/bin/dispatch-bench.rs).

One no-op task on a Redis broker with a Redis result backend, late acknowledgement
(`task_acks_late`: a task is acknowledged to the broker after it ran, not when it was received,
the setting that makes Celery redeliver a task whose worker died). Everything else is Celery's
default (prefork pool, prefetch multiplier 4, JSON serializer).

Settings from the environment:
    GAFFER_BENCH_REDIS_URL  the Redis server, e.g. redis://127.0.0.1:6390 (required); database 0
                            is the broker, database 1 the result backend.
"""

import os

from celery import Celery

_redis = os.environ["GAFFER_BENCH_REDIS_URL"].rstrip("/")

app = Celery("benchapp", broker=f"{_redis}/0", backend=f"{_redis}/1")
app.conf.update(
    task_acks_late=True,
    # The result is what the driver waits for; it must be stored.
    task_ignore_result=False,
    # Results outlive the run (the default is one day); the server is thrown away afterwards.
    result_expires=3600,
    broker_connection_retry_on_startup=True,
)


@app.task(name="benchapp.noop")
def noop():
    """Does nothing: the benchmark measures dispatch, not work."""
    return None
