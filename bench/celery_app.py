"""The peer for bench_dispatch.py: a trivial Celery task with acks_late."""

from __future__ import annotations

import os

from celery import Celery

app = Celery("cellmesh_bench", broker=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.update(
    task_acks_late=True,
    task_ignore_result=True,
    worker_prefetch_multiplier=50,
    task_default_queue=os.environ.get("BENCH_CELERY_QUEUE", "cellmesh_bench_celery"),
    worker_hijack_root_logger=False,
)


@app.task(name="site")
def site(site_job_id: int) -> None:
    """Does nothing: the benchmark measures dispatch alone."""
