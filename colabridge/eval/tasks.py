"""The official 8-task benchmark protocol on user-supplied JSONL files (spec §5.2, §5.6).

Layout, as the official ``scripts/run_benchmark.sh`` expects it: one file per task, named
``<task>.jsonl`` (e.g. ``generate_task_data/mmlu.jsonl``), one JSON object a line:

============== ============================================================================
field          meaning
============== ============================================================================
``question``   the question; the passage for ``race``, the sentence start for ``hellaswag``,
               the story for ``story_cloze``, the whole text to continue for ``lambada``
``context``    the supporting paragraph (``squad`` only, required there)
``choices``    list of option strings (required for mmlu, obqa, hellaswag, race, siqa;
               exactly two endings for story_cloze)
``answer``     the reference (option text or letter); ``ground_truth`` is accepted instead,
               ``answer`` wins when both are given, as in the official ``inference.py``
``id``         optional; seeds the official per-sample noise (int, else CRC32 of ``str(id)``)
``task``       optional; when given it must name the file's task. A file not named after a task
               may mix tasks if every record carries ``task``.
============== ============================================================================

Prompts come from :func:`colabridge.eval.templates.prompt_from_record`, generations from a
:class:`~colabridge.pipelines.ColaPipeline` with the benchmark script's settings
(:data:`OFFICIAL_GENERATION`), scores from :func:`colabridge.eval.templates.score_answer`.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .templates import TASKS, prompt_from_record, score_answer, wrap_chat_ids

__all__ = [
    "OFFICIAL_BATCH_SIZE",
    "OFFICIAL_GENERATION",
    "chat_token_ids",
    "evaluate_tasks",
    "format_table",
    "generate_texts",
    "load_task_records",
    "noise_sample_id",
    "read_task_jsonl",
    "reference_answer",
]

# scripts/run_benchmark.sh: 16 Euler steps, CFG 7, 32 new tokens, greedy, per-sample noise seed 66
# (COLA_INFER_PER_SAMPLE_NOISE_SEED), and outputs are not cut at a stop id: finished samples keep
# generating until the whole batch has stopped, so `drop_finished=False` keeps the official texts.
# The stop ids (eos, im_end) and the pad id are the pipeline's defaults, taken from its tokenizer.
OFFICIAL_GENERATION: dict = dict(
    max_new_tokens=32, num_inference_steps=16, guidance_scale=7.0, temperature=0.0, noise_seed=66, drop_finished=False
)
OFFICIAL_BATCH_SIZE = 20  # run_benchmark.sh BATCH_SIZE; results do not depend on it with noise_seed set

_CHOICE_TASKS = ("mmlu", "obqa", "hellaswag", "race", "siqa", "story_cloze")
_REQUIRED_FIELDS = {task: ("question",) for task in TASKS}
_REQUIRED_FIELDS["squad"] = ("question", "context")
_REQUIRED_FIELDS.update({task: ("question", "choices") for task in _CHOICE_TASKS})
_ANSWER_FIELDS = ("answer", "ground_truth")  # official precedence: answer, then ground_truth
_RESERVED_KWARGS = ("prompt", "prompt_ids", "sample_ids", "output_type")
_CHAT_PIECES = {"im_start_id": "<|im_start|>", "user_id": "user", "assistant_id": "assistant",
                "im_end_id": "<|im_end|>", "newline_id": "\n"}


# ---------------------------------------------------------------------------
# Reading and validating records
# ---------------------------------------------------------------------------


def _check_task(task: object, where: str) -> str:
    if task not in TASKS:
        raise ValueError(f"{where}: unknown task {task!r}; use one of {', '.join(TASKS)}.")
    return task


def _check_record(record: object, task: str, where: str) -> dict:
    """Raise a ValueError naming ``where`` and the field if ``record`` (a dict) cannot be scored for ``task``."""
    missing = [f for f in _REQUIRED_FIELDS[task] if f not in record]
    if not any(f in record for f in _ANSWER_FIELDS):
        missing.append("answer")
    if missing:
        raise ValueError(f"{where}: {task} record misses field(s) {missing}; each {task} record needs "
                         f"{list(_REQUIRED_FIELDS[task])} and 'answer' (or 'ground_truth').")
    for field in ("question", "context", *_ANSWER_FIELDS):
        if field in record and not isinstance(record[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {record[field]!r}"
                             f"{' (give the option text or letter, not an index)' if field in _ANSWER_FIELDS else ''}.")
    choices = record.get("choices")
    if task in _CHOICE_TASKS and not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
        raise ValueError(f"{where}: field 'choices' must be a non-empty list of option strings, got {choices!r}.")
    if task == "story_cloze" and len(choices) != 2:
        raise ValueError(f"{where}: story_cloze needs exactly 2 choices (the two endings), got {len(choices)}.")
    return record


def _record_task(record: object, file_task: str | None, default_task: str | None, where: str) -> str:
    """The record's ``task`` field, else the file's task (from its name), else ``default_task``.

    A ``task`` field must agree with a task-named file (``mmlu.jsonl`` holds only mmlu records).
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    named = record.get("task")
    if named is not None:
        _check_task(named, where)
        if file_task is not None and named != file_task:
            raise ValueError(f"{where}: record says task {named!r} but the file holds {file_task!r} records.")
        return named
    task = file_task or default_task
    if task is None:
        raise ValueError(f"{where}: no task for this record; add a 'task' field, name the file <task>.jsonl "
                         f"or pass the task explicitly.")
    return _check_task(task, where)


def read_task_jsonl(path: str | Path, default_task: str | None = None) -> dict[str, list[dict]]:
    """Read and validate one JSONL file; returns ``{task: [record, ...]}`` in file order.

    A record's task is its ``task`` field, else the file name's stem when that is a task name
    (official layout), else ``default_task``. Errors name the file, the 1-based line and the field.
    """
    path = Path(path)
    file_task = path.stem if path.stem in TASKS else None
    grouped: dict[str, list[dict]] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON ({err.msg} at column {err.colno}); "
                             f"write one JSON object per line.") from None
        task = _record_task(record, file_task, default_task, where)
        grouped.setdefault(task, []).append(_check_record(record, task, where))
    return grouped


def _records_from(source: object, task: str) -> list[dict]:
    """Records of ``task`` from a path or from in-memory records (validated, named ``task[i]``)."""
    if isinstance(source, (str, Path)):
        return read_task_jsonl(source, task).get(task, [])
    return [_check_record(r, _record_task(r, task, None, f"{task}[{i}]"), f"{task}[{i}]") for i, r in enumerate(source)]


def _from_directory(folder: Path, tasks: Sequence[str] | None) -> dict[str, list[dict]]:
    """``<task>.jsonl`` files of ``folder``; with ``tasks`` unset, absent files are skipped (official)."""
    wanted = tasks or [t for t in TASKS if (folder / f"{t}.jsonl").is_file()]
    if not wanted:
        raise FileNotFoundError(f"{folder} holds no <task>.jsonl file; expected names like {TASKS[0]}.jsonl.")
    missing = [str(folder / f"{t}.jsonl") for t in wanted if not (folder / f"{t}.jsonl").is_file()]
    if missing:
        raise FileNotFoundError(f"task file(s) not found: {missing}.")
    return {t: _records_from(folder / f"{t}.jsonl", t) for t in wanted}


def load_task_records(data: object, tasks: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """Validated records per task from ``data``, restricted to ``tasks`` (default: every task present).

    ``data`` is a folder of ``<task>.jsonl`` files, one JSONL file (each record's task: its ``task``
    field, else the file name, else ``tasks`` when that names exactly one), or a mapping
    ``{task: path or list of record dicts}``.
    """
    tasks = [tasks] if isinstance(tasks, str) else (list(tasks) if tasks else None)
    for task in tasks or []:
        _check_task(task, "tasks")
    if isinstance(data, Mapping):
        records = {_check_task(t, "data"): _records_from(src, t) for t, src in data.items()}
    elif Path(data).is_dir():
        records = _from_directory(Path(data), tasks)
    else:
        records = read_task_jsonl(data, tasks[0] if tasks and len(tasks) == 1 else None)
    if tasks:
        records = {t: records.get(t, []) for t in tasks}
    empty = [t for t, rs in records.items() if not rs]
    if not records or empty:
        raise ValueError(f"no records for task(s) {empty or 'any'} in {data!s:.200}; give at least one record per task.")
    return records


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------


def chat_token_ids(tokenizer) -> dict[str, int]:
    """The five ids of the SFT chat wrapping (spec §5.2), each of which must be a single token."""
    ids = {}
    for name, piece in _CHAT_PIECES.items():
        encoded = tokenizer(piece, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ValueError(f"chat wrapping needs {piece!r} to be one token, but this tokenizer encodes it as "
                             f"{encoded}; evaluate without chat wrapping or use a ChatML tokenizer.")
        ids[name] = encoded[0]
    return ids


def noise_sample_id(record_id: object, index_in_batch: int) -> int:
    """Official per-sample noise id: ``int(id)``, else CRC32 of ``str(id)``, else the batch index."""
    if record_id is None:
        return index_in_batch
    try:
        return int(record_id)
    except (TypeError, ValueError):
        return zlib.crc32(str(record_id).encode("utf-8")) & 0xFFFFFFFF


def generate_texts(pipe, prompts: list[str], record_ids: list, chat: bool = False, **generation_kwargs) -> list[str]:
    """Generate one batch: official tokenisation (+ optional chat wrapping), per-sample noise ids."""
    ids = pipe.tokenize(prompts)
    if chat:
        special = chat_token_ids(pipe.tokenizer)
        ids = [wrap_chat_ids(x, **special) for x in ids]
    sample_ids = [noise_sample_id(r, i) for i, r in enumerate(record_ids)]
    return pipe(prompt_ids=ids, sample_ids=sample_ids, output_type="text", **generation_kwargs).texts


# ---------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------


def reference_answer(record: Mapping) -> str:
    """The record's reference: ``answer``, else ``ground_truth`` (official precedence)."""
    return record["answer"] if "answer" in record else record["ground_truth"]


def _prediction(task: str, record: dict, prompt: str, generated: str) -> dict:
    """One output row: the official output fields plus ``task`` and ``correct``."""
    row = {"task": task, "id": record.get("id"), "prompt": prompt, "generate": generated,
           "ground_truth": reference_answer(record)}
    if record.get("choices"):
        row["choices"] = record["choices"]
    row["correct"] = score_answer(task, generated, row["ground_truth"], record.get("choices"))
    return row


def _evaluate_task(pipe, task: str, records: list[dict], batch_size: int, chat: bool, callback, settings) -> list[dict]:
    """Prediction rows of one task, generated ``batch_size`` prompts at a time."""
    prompts = [prompt_from_record(r, task) for r in records]
    rows = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        texts = generate_texts(pipe, prompts[start : start + batch_size], [r.get("id") for r in batch], chat, **settings)
        rows += [_prediction(task, r, p, t) for r, p, t in zip(batch, prompts[start:], texts)]
        if callback is not None:
            callback(task, len(rows), len(records))
    return rows


def _summary(rows: list[dict]) -> dict:
    correct = sum(bool(r["correct"]) for r in rows)
    return {"accuracy": correct / len(rows) if rows else 0.0, "correct": correct, "total": len(rows)}


def _check_settings(batch_size: int, limit: int | None, generation_kwargs: dict) -> None:
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}.")
    if limit is not None and not (isinstance(limit, int) and limit >= 1):
        raise ValueError(f"`limit` must be None or an int >= 1, got {limit!r}.")
    reserved = [k for k in _RESERVED_KWARGS if k in generation_kwargs]
    if reserved:
        raise ValueError(f"{reserved} are set by evaluate_tasks from the records; drop them from the call.")


def _jsonable(settings: dict) -> dict:
    return {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v) for k, v in settings.items()}


def evaluate_tasks(pipe, data, tasks: str | Sequence[str] | None = None, limit: int | None = None,
                   batch_size: int = OFFICIAL_BATCH_SIZE, chat: bool = False,
                   callback: Callable[[str, int, int], None] | None = None, **generation_kwargs) -> dict:
    """Run the official benchmark protocol: template → generate → ``acc_calc.py`` score.

    Args:
        pipe: a :class:`~colabridge.pipelines.ColaPipeline`.
        data: a folder of ``<task>.jsonl`` files, one JSONL file, or ``{task: path or list of dicts}``
            (record fields: see the module docstring).
        tasks: task name(s) to run; default every task present in ``data``.
        limit: first ``limit`` records of each task (the official script uses 1000); ``None`` = all.
        batch_size: prompts per pipeline call.
        chat: wrap prompt ids in the SFT chat layout (needs ChatML tokens in the tokenizer).
        callback: ``fn(task, done, total)`` after every batch (progress reporting).
        **generation_kwargs: ``ColaPipeline`` arguments overriding :data:`OFFICIAL_GENERATION`.

    Returns:
        ``{"tasks": {task: {"accuracy", "correct", "total"}}, "average": mean accuracy over tasks,
        "settings": {...}, "predictions": {task: [row, ...]}}``; accuracies are fractions in [0, 1]
        and each row holds ``task, id, prompt, generate, ground_truth, (choices,) correct``.
    """
    _check_settings(batch_size, limit, generation_kwargs)
    records = {t: rs[:limit] for t, rs in load_task_records(data, tasks).items()}
    settings = {**OFFICIAL_GENERATION, **generation_kwargs}
    predictions = {t: _evaluate_task(pipe, t, rs, batch_size, chat, callback, settings) for t, rs in records.items()}
    summary = {t: _summary(rows) for t, rows in predictions.items()}
    average = sum(s["accuracy"] for s in summary.values()) / len(summary)
    return {"tasks": summary, "average": average,
            "settings": _jsonable({**settings, "batch_size": batch_size, "limit": limit, "chat": chat}),
            "predictions": predictions}


def format_table(result: dict) -> str:
    """A small text table of :func:`evaluate_tasks` results (accuracy in percent, like ``acc_calc.py``)."""
    lines = [f"{'task':<12} {'n':>6} {'correct':>8} {'acc %':>7}"]
    for task, s in result["tasks"].items():
        lines.append(f"{task:<12} {s['total']:>6} {s['correct']:>8} {100 * s['accuracy']:>7.2f}")
    lines.append(f"{'average':<12} {'':>6} {'':>8} {100 * result['average']:>7.2f}")
    return "\n".join(lines)
