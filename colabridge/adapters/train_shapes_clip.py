"""Train a tiny open_clip CLIP on the shapes world, save it as a ``ColaClipEmbedder`` folder and measure it.

Reads top to bottom: build ``open_clip.CLIP`` (small ViT + small text transformer over the caption
tokenizer of ``pipelines/shapes-text``) → contrastive loop with ``open_clip.ClipLoss`` on fresh
``"train"``-split scenes every step (no held-out (shape, colour) pair is ever seen) → save
(``config.json`` + safetensors + ``tokenizer/``) → evaluate on held-out-composition scenes:
text → image R@1/R@5 among ``--eval-num`` images and zero-shot (shape, colour) accuracy.

Usage::

    python -m colabridge.adapters.train_shapes_clip --tokenizer pipelines/shapes-text/tokenizer \\
        --out runs/shapes-clip --save pipelines/shapes-clip --steps 3000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..data.shapes import COLORS, SHAPES, make_examples
from ..eval.retrieval import recall_at_k
from ..models.clip import TOKENIZER_FOLDER, ClipCaptionTokenizer, ColaClipEmbedder, load_clip

EVAL_SEED = 2024  # the held-out scenes every shapes-world card reports on
ZERO_SHOT_TEMPLATE = "a picture of a {color} {shape}"


def build(args, tokenizer: ClipCaptionTokenizer) -> ColaClipEmbedder:
    """A random-init tiny CLIP; the text tower pools at the tokenizer's eos (``pool_type="eos"``)."""
    vision = {"image_size": args.image_size, "patch_size": args.patch_size, "width": args.width,
              "layers": args.layers, "head_width": args.head_width}
    text = {"context_length": args.context_length, "vocab_size": tokenizer.vocab_size, "width": args.width,
            "heads": args.width // args.head_width, "layers": args.layers, "pad_id": tokenizer.pad_token_id,
            "eos_id": tokenizer.eos_token_id, "pool_type": "eos"}
    return ColaClipEmbedder(embed_dim=args.embed_dim, vision_cfg=vision, text_cfg=text)


def batch(embedder, tokenizer, examples) -> tuple[torch.Tensor, torch.LongTensor]:
    """(preprocessed pixels ``(B, 3, S, S)``, caption ids ``(B, L)``) of shapes-world examples."""
    return embedder.preprocess(np.stack([e.image for e in examples])), tokenizer([e.caption for e in examples])


def train(args) -> tuple[ColaClipEmbedder, ClipCaptionTokenizer, dict]:
    import open_clip

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    tokenizer = ClipCaptionTokenizer(args.tokenizer, args.context_length)
    embedder = build(args, tokenizer).train()
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(embedder.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    log, start, losses = open(out / "log.csv", "w"), time.time(), []
    log.write("step,seconds,lr,loss\n")
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + np.cos(np.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        # a fresh train-split batch each step: seed = run seed × large prime + step (reproducible, never repeats)
        pixels, ids = batch(embedder, tokenizer, make_examples(args.batch_size, seed=args.seed * 1_000_003 + step,
                                                               split="train", image_size=args.image_size))
        image_features, text_features, logit_scale = embedder(pixels, ids)
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # CLIP clamps the learned temperature at 100 (log 4.6052)
            embedder.model.logit_scale.clamp_(0, np.log(100))
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0:
            line = f"{step + 1},{time.time() - start:.1f},{lr:.2e},{np.mean(losses[-args.log_every:]):.4f}"
            log.write(line + "\n")
            log.flush()
            print(line, flush=True)
    stats = {"steps": args.steps, "wall_time_s": round(time.time() - start),
             "final_loss": float(np.mean(losses[-args.log_every:])), "batch_size": args.batch_size}
    return embedder.eval(), tokenizer, stats


@torch.no_grad()
def evaluate(embedder, tokenizer, num: int, seed: int = EVAL_SEED, split: str = "heldout") -> dict:
    """Text → image R@1/R@5 of captions among ``num`` images of ``split``, and zero-shot (shape, colour)
    accuracy of its one-object scenes against all 24 ``ZERO_SHOT_TEMPLATE`` prompts."""
    examples = make_examples(num, seed=seed, split=split, image_size=embedder.image_size)
    pixels, ids = batch(embedder, tokenizer, examples)
    images, texts = embedder.encode_image(pixels), embedder.encode_text(ids)
    metrics = {"split": split, "num": num, "text_to_image": recall_at_k(texts, images)}
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    prompts = embedder.encode_text(tokenizer([ZERO_SHOT_TEMPLATE.format(color=c, shape=s) for s, c in pairs]))
    single = [i for i, e in enumerate(examples) if len(e.scene.objects) == 1]
    guess = (images[single] @ prompts.T).argmax(1).tolist()
    truth = [pairs.index((examples[i].scene.objects[0].shape, examples[i].scene.objects[0].color)) for i in single]
    metrics["zero_shot_shape_colour"] = {"accuracy": float(np.mean([g == t for g, t in zip(guess, truth)])),
                                         "num_one_object_scenes": len(single), "chance": 1 / len(pairs)}
    return metrics


def save(embedder, tokenizer, folder: str | Path, metrics: dict) -> None:
    """Write the folder :func:`~colabridge.models.clip.load_clip` reads, plus ``metrics.json``."""
    folder = Path(folder)
    embedder.save_pretrained(folder)
    tokenizer.save_pretrained(folder / TOKENIZER_FOLDER)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer folder (eos + pad) for the captions")
    p.add_argument("--out", required=True, help="run folder for log.csv")
    p.add_argument("--save", default=None, help="write the trained CLIP folder here (config, safetensors, tokenizer)")
    p.add_argument("--eval-only", default=None, help="evaluate this saved CLIP folder instead of training")
    p.add_argument("--steps", type=int, default=3000, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=128, help="image-caption pairs per step (contrastive batch)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then cosine decay")
    p.add_argument("--embed-dim", type=int, default=64, help="joint embedding width D")
    p.add_argument("--width", type=int, default=64, help="width of both towers")
    p.add_argument("--layers", type=int, default=2, help="transformer layers of both towers")
    p.add_argument("--head-width", type=int, default=32, help="attention head width (heads = width / head-width)")
    p.add_argument("--patch-size", type=int, default=4, help="ViT patch side in pixels")
    p.add_argument("--image-size", type=int, default=32, help="shapes-world image side")
    p.add_argument("--context-length", type=int, default=24, help="caption ids per text (with eos)")
    p.add_argument("--eval-num", type=int, default=200, help="held-out scenes in the evaluation")
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    p.add_argument("--seed", type=int, default=0, help="seed of init and batches")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.eval_only:
        embedder, tokenizer = load_clip(args.eval_only)
        print(json.dumps(evaluate(embedder, tokenizer, args.eval_num), indent=2))
        return
    embedder, tokenizer, stats = train(args)
    metrics = {"training": stats, "heldout": evaluate(embedder, tokenizer, args.eval_num),
               "train_split": evaluate(embedder, tokenizer, args.eval_num, split="train")}
    print(json.dumps(metrics, indent=2), flush=True)
    if args.save:
        save(embedder, tokenizer, args.save, metrics)


if __name__ == "__main__":
    main()
