"""Text → CLIP-image-embedding prior: caption → image retrieval on held-out-composition scenes.

For ``--num`` shapes-world scenes of a split (default ``heldout``: every scene has an unseen (shape, colour)
pair), each caption queries the image tower's embeddings of all ``N`` images: R@1 / R@5 of one prior sample
per caption (``ColaClipPriorPipeline``), beside chance (1/N, 5/N) and beside the CLIP text tower's own
embedding of the caption. Prints a markdown table.

    python benchmarks/bench_clip_prior.py
    python benchmarks/bench_clip_prior.py --split train --guidance 1 3 5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from colabridge.data.shapes import make_examples
from colabridge.eval.retrieval import clip_prior_retrieval
from colabridge.models.clip import load_clip
from colabridge.pipelines import ColaClipPriorPipeline

ROOT = Path(__file__).resolve().parent.parent
EVAL_SEED = 2024  # the held-out scenes every shapes-world card reports on


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text-model", default=str(ROOT / "pipelines" / "shapes-text"), help="ColaPipeline folder")
    p.add_argument("--adapter", default=str(ROOT / "adapters" / "shapes-clip-prior"), help="CLIP-prior adapter folder")
    p.add_argument("--clip", default=str(ROOT / "pipelines" / "shapes-clip"), help="ColaClipEmbedder folder")
    p.add_argument("--split", default="heldout", choices=("heldout", "train"), help="shapes-world split of the scenes")
    p.add_argument("--num", type=int, default=200, help="scenes N (chance R@1 = 1/N)")
    p.add_argument("--steps", type=int, default=16, help="solver steps for the embedding block")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0], help="CFG scales")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pipe = ColaClipPriorPipeline.from_parts(args.text_model, args.adapter, args.clip)
    pipe.set_progress_bar_config(disable=True)
    _, tokenizer = load_clip(args.clip)
    examples = make_examples(args.num, seed=EVAL_SEED, split=args.split, image_size=pipe.image_encoder.image_size)
    rows = {g: clip_prior_retrieval(pipe, tokenizer, examples, args.steps, g, EVAL_SEED) for g in args.guidance}
    print(f"{args.split} scenes, N = {args.num}, {args.steps} steps\n")
    print("| query | CFG | R@1 | R@5 | chance R@1 | chance R@5 |\n|---|---|---|---|---|---|")
    for g, r in rows.items():
        print(f"| prior sample | {g:g} | {r['prior']['R@1']:.3f} | {r['prior']['R@5']:.3f} | "
              f"{r['prior']['chance@1']:.3f} | {r['prior']['chance@5']:.3f} |")
    t = next(iter(rows.values()))["text_tower"]
    print(f"| CLIP text tower | – | {t['R@1']:.3f} | {t['R@5']:.3f} | {t['chance@1']:.3f} | {t['chance@5']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({f"cfg{g:g}": r for g, r in rows.items()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
