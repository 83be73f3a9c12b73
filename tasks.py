"""The Celery worker service's `tasks` module, for callers written against it (backed by Dramatiq).

from tasks import evaluate_code, health_check, cleanup_old_evaluations
"""

from app.celery.shim import (
    AsyncResult,
    DeadLetterQueue,
    EvaluationFailed,
    TaskRevokedError,
    TimeoutError,
    cancel_celery_task,
    cleanup_old_evaluations,
    evaluate_code,
    get_celery_task_info,
    health_check,
    monitor_dead_letter_queue,
)

__all__ = [
    "AsyncResult",
    "DeadLetterQueue",
    "EvaluationFailed",
    "TaskRevokedError",
    "TimeoutError",
    "cancel_celery_task",
    "cleanup_old_evaluations",
    "evaluate_code",
    "get_celery_task_info",
    "health_check",
    "monitor_dead_letter_queue",
]
