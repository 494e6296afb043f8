"""The task registry: every built-in task, registered explicitly here."""
from mtkd.spec import get_task, list_tasks, register_task

from . import task_a, task_b

register_task(task_a.TASK)
register_task(task_a.TASK_85)
register_task(task_b.TASK)

__all__ = ["get_task", "list_tasks", "register_task"]
