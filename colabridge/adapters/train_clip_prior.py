"""Train a text → CLIP-image-embedding prior adapter on the shapes world and measure retrieval.

Reads top to bottom: load (text pipeline + CLIP, frozen) → encode the training set once (prompt
latents; unit-norm image embeddings, whose statistics standardise the ``"open_clip"`` space) → add
LoRA + projections → flow matching on ``[caption blocks | embedding block]`` with condition dropout
for CFG → export (PEFT adapter folder) → evaluate: R@1/R@5 of prior samples among held-out images,
beside chance and the CLIP text tower's own R@1.

Usage::

    python -m colabridge.adapters.train_clip_prior --text-model pipelines/shapes-text \\
        --clip pipelines/shapes-clip --out runs/shapes-clip-prior --export adapters/shapes-clip-prior
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..data.shapes import make_examples
from ..eval.retrieval import clip_prior_retrieval
from ..models.clip import load_clip
from ..training.losses import FlowMatchingConfig
from .clip_space import CLIP_MODALITY as MODALITY
from .clip_space import ClipEmbeddingSpace
from .losses import flow_matching_loss_image
from .multimodal import MultimodalPrior
from .saving import add_image_adapter, save_image_adapter
from .train_shapes import ENCODE_BATCH, _cat_padded, learning_rate

EVAL_SEED = 2024  # the held-out scenes every shapes-world card reports on


def load_bases(text_model: str, clip: str):
    from ..pipelines import ColaPipeline

    text = ColaPipeline.from_pretrained(text_model)
    embedder, _ = load_clip(clip)
    for module in (text.vae, text.transformer, embedder):
        module.requires_grad_(False)
    return text, embedder


@torch.no_grad()
def encode_dataset(text, embedder, num: int, seed: int) -> dict:
    """Prompt latents (left-aligned, as the pipeline's history) and unit-norm image embeddings ``(N, D)``."""
    from ..pipelines.pipeline_image import encode_captions

    examples = make_examples(num, seed=seed, split="train", image_size=embedder.image_size)
    tok, bs = text.tokenizer, text.transformer.config.block_size
    out = {"prompt": [], "prompt_valid": [], "embeds": []}
    for i in range(0, num, ENCODE_BATCH):
        chunk = examples[i: i + ENCODE_BATCH]
        latents, valid = encode_captions(text.vae, tok, [e.caption for e in chunk], bs, tok.pad_token_id, left=True)
        out["prompt"].append(latents)
        out["prompt_valid"].append(valid)
        out["embeds"].append(embedder.embed_images(np.stack([e.image for e in chunk])).float())
    return {k: _cat_padded(v, left=True) if k.startswith("prompt") else torch.cat(v) for k, v in out.items()}


def train_step(prior, data, idx, space, args, fm, gen) -> torch.Tensor:
    """Flow-matching loss of one batch (text → embedding block, condition dropout for CFG)."""
    tokens = space.tokens_from_embeds(data["embeds"][idx])  # (B, k, D/k)
    loss, _ = flow_matching_loss_image(prior, data["prompt"][idx], tokens, "text_to_image", data["prompt_valid"][idx],
                                       modality=MODALITY, cfg=fm, drop_condition_prob=args.drop_prob, generator=gen)
    return loss


def train(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    text, embedder = load_bases(args.text_model, args.clip)
    data = encode_dataset(text, embedder, args.num_train, args.seed)
    space = ClipEmbeddingSpace.from_embeddings(data["embeds"], args.num_tokens)
    adapter = add_image_adapter(text.transformer, space, r=args.rank, adapter_name=MODALITY)
    prior = MultimodalPrior(text.transformer, {MODALITY: adapter})
    params = [p for p in prior.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    fm, n, start, losses = FlowMatchingConfig(), data["embeds"].shape[0], time.time(), []
    log = open(out / "log.csv", "w")
    log.write("step,seconds,lr,fm_loss\n")
    for step in range(args.steps):
        lr = learning_rate(args, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        loss = train_step(prior, data, torch.randint(n, (args.batch_size,), generator=gen), space, args, fm, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0:
            line = f"{step + 1},{time.time() - start:.1f},{lr:.2e},{np.mean(losses[-args.log_every:]):.4f}"
            log.write(line + "\n")
            log.flush()
            print(line, flush=True)
    stats = {"steps": args.steps, "wall_time_s": round(time.time() - start), "batch_size": args.batch_size,
             "final_fm_loss": float(np.mean(losses[-args.log_every:]))}
    save_image_adapter(text.transformer, adapter.eval(), args.export or out / "adapter", adapter_name=MODALITY)
    return stats


def evaluate(args) -> dict:
    """Retrieval on ``--eval-num`` held-out and train-split scenes at each ``--eval-guidance``."""
    from ..pipelines import ColaClipPriorPipeline

    folder = args.export or Path(args.out) / "adapter"
    pipe = ColaClipPriorPipeline.from_parts(args.text_model, folder, args.clip)
    pipe.set_progress_bar_config(disable=True)
    _, clip_tokenizer = load_clip(args.clip)
    metrics = {}
    for split in ("heldout", "train"):
        examples = make_examples(args.eval_num, seed=EVAL_SEED, split=split, image_size=pipe.image_encoder.image_size)
        for guidance in args.eval_guidance:
            key = f"{split}_cfg{guidance:g}"
            metrics[key] = clip_prior_retrieval(pipe, clip_tokenizer, examples, args.eval_steps, guidance, EVAL_SEED)
            print(key, json.dumps(metrics[key]), flush=True)
    return metrics


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text-model", required=True, help="ColaPipeline folder whose text VAE + DiT know the captions")
    p.add_argument("--clip", required=True, help="ColaClipEmbedder folder (pipelines/shapes-clip)")
    p.add_argument("--out", required=True, help="run folder (log.csv; the adapter if no --export)")
    p.add_argument("--export", default=None, help="write the adapter folder here (PEFT + projections + metrics.json)")
    p.add_argument("--eval-only", action="store_true", help="skip training; evaluate the exported adapter")
    p.add_argument("--steps", type=int, default=3000, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=64, help="examples per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (LoRA + projections)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then cosine decay")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank on the DiT trunk")
    p.add_argument("--num-tokens", type=int, default=8, help="DiT tokens per embedding (divides D; multiple of block)")
    p.add_argument("--num-train", type=int, default=8000, help="training scenes, encoded once")
    p.add_argument("--drop-prob", type=float, default=0.1, help="condition dropout (trains the CFG uncond branch)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, init and batches")
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--eval-num", type=int, default=200, help="scenes per retrieval evaluation (N; chance = 1/N)")
    p.add_argument("--eval-steps", type=int, default=16, help="solver steps in evaluation")
    p.add_argument("--eval-guidance", type=float, nargs="+", default=[1.0, 3.0], help="CFG scales to evaluate")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    metrics = {} if args.eval_only else {"training": train(args)}
    metrics.update(evaluate(args))
    folder = Path(args.export or Path(args.out) / "adapter")
    previous = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
    (folder / "metrics.json").write_text(json.dumps({**previous, **metrics}, indent=2) + "\n")


if __name__ == "__main__":
    main()
