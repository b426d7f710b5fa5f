"""Benchmark evaluation: official Cola DLM prompt templates, chat wrapping, scoring and the 8-task protocol."""

from .tasks import OFFICIAL_GENERATION, evaluate_tasks, load_task_records
from .templates import (
    TASKS,
    apply_prompt_template,
    format_choices,
    prompt_from_record,
    score_answer,
    truncate_generation,
    wrap_chat_ids,
)

__all__ = [
    "OFFICIAL_GENERATION",
    "TASKS",
    "apply_prompt_template",
    "evaluate_tasks",
    "format_choices",
    "load_task_records",
    "prompt_from_record",
    "score_answer",
    "truncate_generation",
    "wrap_chat_ids",
]
