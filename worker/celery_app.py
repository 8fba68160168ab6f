"""The Celery application. Reliability settings chosen on purpose (see DESIGN.md):

- ``task_acks_late``: a message is acknowledged after the task returns, so a lost worker's job is delivered again;
- ``task_reject_on_worker_lost``: a child killed mid-task re-queues the message instead of acking it;
- ``worker_prefetch_multiplier = 1``: a worker reserves one message at a time (long training tasks must not
  sit in one worker's buffer while another is idle);
- JSON only (never pickle); no result backend (the database holds job results, adapt results go back on a
  per-request Redis list);
- four queues: ``train`` (long), ``adapt`` (short, latency-sensitive), ``adapt_heavy`` (adapt requests whose
  estimated cost is above METASHRINK_ADAPT_HEAVY_FLOPS, on workers of their own: one tenant's maximum-size
  adaptations then never sit in front of another tenant's small ones) and ``datasets`` (decoding uploads:
  seconds to a minute). Uploads get their own queue and, in the embedded default, their own worker: on
  ``train`` an upload would wait behind hours of training (the embedded train worker runs one task at a time),
  and on ``adapt`` a minute of decoding would hold a worker that requests with deadlines wait for.

The lease in the database, not the broker, decides who runs a job. The parent process never imports torch:
tasks run in the prefork child, which is where CUDA may be initialised.
"""
from __future__ import annotations

from celery import Celery
from kombu import Queue

from store.settings import Settings

TRAIN_QUEUE = "train"
ADAPT_QUEUE = "adapt"
ADAPT_HEAVY_QUEUE = "adapt_heavy"
DATASETS_QUEUE = "datasets"
QUEUES = (TRAIN_QUEUE, ADAPT_QUEUE, ADAPT_HEAVY_QUEUE, DATASETS_QUEUE)
RUN_JOB = "worker.tasks.run_job"
ADAPT = "worker.tasks.adapt"
RUN_EVALUATION = "worker.tasks.run_evaluation"
ADAPTER_PREDICT = "worker.tasks.adapter_predict"
ADAPTERS_PREDICT = "worker.tasks.adapters_predict"
PROCESS_DATASET = "worker.dataset_tasks.process_dataset"
# multi-node jobs (worker/ranks.py): the claiming train worker asks the other machines' join workers for their
# ranks on this queue. Not in QUEUES: a deployment without multi-node jobs runs no join worker and is still ready
JOIN_QUEUE = "join"
JOIN_JOB = "worker.ranks.join_job"


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    app = Celery("metashrink", broker=settings.broker(), include=["worker.tasks", "worker.dataset_tasks",
                                                                  "worker.ranks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_queues=[Queue(q) for q in QUEUES + (JOIN_QUEUE,)],
        task_default_queue=TRAIN_QUEUE,
        task_routes={RUN_JOB: {"queue": TRAIN_QUEUE}, ADAPT: {"queue": ADAPT_QUEUE},
                     RUN_EVALUATION: {"queue": TRAIN_QUEUE}, ADAPTER_PREDICT: {"queue": ADAPT_QUEUE},
                     ADAPTERS_PREDICT: {"queue": ADAPT_QUEUE},
                     PROCESS_DATASET: {"queue": DATASETS_QUEUE}, JOIN_JOB: {"queue": JOIN_QUEUE}},
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 3600},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_time_limit=None,
        worker_cancel_long_running_tasks_on_connection_loss=True,
    )
    app.conf.metashrink_settings = settings
    return app


app = make_celery()
