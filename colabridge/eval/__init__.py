"""Benchmark evaluation helpers: official Cola DLM prompt templates, chat wrapping and scoring."""

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
    "TASKS",
    "apply_prompt_template",
    "format_choices",
    "prompt_from_record",
    "score_answer",
    "truncate_generation",
    "wrap_chat_ids",
]
