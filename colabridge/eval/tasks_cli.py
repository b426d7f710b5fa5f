"""``colabridge eval tasks``: the official 8-task benchmark on user-supplied JSONL files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .tasks import OFFICIAL_BATCH_SIZE, OFFICIAL_GENERATION, evaluate_tasks, format_table
from .templates import TASKS


def add_tasks_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``tasks`` on the ``colabridge eval`` sub-command parsers."""
    p = subparsers.add_parser("tasks", help="official 8-task prompt/score protocol on JSONL files",
                              description="Template, generate and score benchmark records the way the official "
                                          "run_benchmark.sh + acc_calc.py do. Records: one JSON object a line with "
                                          "question, answer (or ground_truth), and context (squad) / choices "
                                          "(multiple choice, story_cloze); optional id and task.")
    p.add_argument("--data", required=True,
                   help="a folder of <task>.jsonl files (official layout) or one JSONL file")
    p.add_argument("--task", nargs="+", choices=TASKS, metavar="TASK",
                   help=f"task(s) to run, of {', '.join(TASKS)}; default: from the file names or records' 'task'")
    p.add_argument("--model", help="pipeline folder; default: the embedded model")
    p.add_argument("--limit", type=int, default=None, help="first N records per task (official script: 1000); default all")
    p.add_argument("--batch-size", type=int, default=OFFICIAL_BATCH_SIZE, help="prompts per pipeline call")
    p.add_argument("--max-new-tokens", type=int, default=OFFICIAL_GENERATION["max_new_tokens"], help="tokens to generate")
    p.add_argument("--steps", type=int, default=OFFICIAL_GENERATION["num_inference_steps"], help="Euler steps per block")
    p.add_argument("--guidance-scale", type=float, default=OFFICIAL_GENERATION["guidance_scale"], help="CFG scale")
    p.add_argument("--noise-seed", type=int, default=OFFICIAL_GENERATION["noise_seed"],
                   help="official per-sample noise seed (benchmark script: 66)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the SFT chat layout (ChatML tokenizers)")
    p.add_argument("--output", help="write one prediction a line (task, id, prompt, generate, ground_truth, correct)")
    p.add_argument("--summary", help="write per-task accuracy, counts and settings as JSON")
    p.set_defaults(func=cmd_eval_tasks)
    return p


def _progress(task: str, done: int, total: int) -> None:
    print(f"[eval] {task}: {done}/{total}", file=sys.stderr)


def cmd_eval_tasks(args) -> None:
    from ..paths import default_text_model
    from ..pipelines import ColaPipeline

    pipe = ColaPipeline.from_pretrained(args.model or default_text_model())
    pipe.set_progress_bar_config(disable=True)
    result = evaluate_tasks(pipe, args.data, tasks=args.task, limit=args.limit, batch_size=args.batch_size,
                            chat=args.chat, callback=_progress, max_new_tokens=args.max_new_tokens,
                            num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                            noise_seed=args.noise_seed)
    print(format_table(result))
    if args.output:
        rows = [row for task_rows in result["predictions"].values() for row in task_rows]
        Path(args.output).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    if args.summary:
        summary = {k: v for k, v in result.items() if k != "predictions"}
        Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
