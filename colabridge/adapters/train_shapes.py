"""Train an image adapter on the shapes world (text → image and image → text in one adapter) and measure it.

Reads top to bottom: load (text pipeline + AutoencoderKL, frozen) → encode the training set once →
add LoRA + projections (fresh, or an exported adapter's with ``--init-adapter``) → flow-matching loop
(both directions, condition dropout for CFG; exact resume from ``out/checkpoints``) → export (PEFT adapter folder + a fused image pipeline folder) →
evaluate on held-out (shape, colour) compositions with the exact readers.

Usage::

    python -m colabridge.adapters.train_shapes --text-model pipelines/shapes-text \\
        --autoencoder pipelines/shapes-autoencoder --out runs/shapes-adapter --steps 2000
    python -m colabridge.adapters.train_shapes ... --export adapters/shapes-image --pipeline pipelines/cola-shapes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from ..data.shapes import make_examples, score, score_caption
from ..training.checkpointing import (
    latest_checkpoint,
    load_latest_checkpoint,
    load_model_weights,
    read_state,
    save_checkpoint,
)
from ..training.losses import FlowMatchingConfig
from .latent_spaces import ImageLatentSpace
from .losses import flow_matching_loss_image
from .multimodal import MultimodalPrior
from .saving import DEFAULT_ADAPTER, add_image_adapter, load_image_adapter, save_image_adapter

DATA = "data.safetensors"
ENCODE_BATCH = 256


def load_bases(text_model: str, autoencoder: str):
    from ..pipelines import ColaPipeline

    text = ColaPipeline.from_pretrained(text_model)
    ae = AutoencoderKL.from_pretrained(autoencoder).eval()
    for module in (text.vae, text.transformer, ae):
        module.requires_grad_(False)
    return text, ae


@torch.no_grad()
def encode_dataset(text, ae, space: ImageLatentSpace, num: int, seed: int) -> dict:
    """Training tensors: prompt latents (left-aligned, no eos), caption latents (+eos, from 0), image tokens."""
    from ..pipelines.pipeline_image import encode_captions

    examples = make_examples(num, seed=seed, split="train", image_size=space.sample_size)
    tok, bs, pad = text.tokenizer, text.transformer.config.block_size, text.tokenizer.pad_token_id
    eos = tok.eos_token or ""
    out = {"prompt": [], "prompt_valid": [], "caption": [], "caption_valid": [], "image": []}
    for i in range(0, num, ENCODE_BATCH):
        chunk = examples[i: i + ENCODE_BATCH]
        captions = [e.caption for e in chunk]
        for key, texts, left in (("prompt", captions, True), ("caption", [c + eos for c in captions], False)):
            lat, valid = encode_captions(text.vae, tok, texts, bs, pad, left=left)
            out[key].append(lat)
            out[f"{key}_valid"].append(valid)
        pixels = torch.from_numpy(np.stack([e.image for e in chunk])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        out["image"].append(space.encode(ae, pixels))
    return {k: _cat_padded(v, left=k.startswith("prompt")) for k, v in out.items()}


def _cat_padded(chunks: list[torch.Tensor], left: bool) -> torch.Tensor:
    """Concatenate along the batch, zero-padding the token axis (on the left for left-aligned prompts)."""
    width = max(c.shape[1] for c in chunks)
    padded = []
    for c in chunks:
        pad = [0, 0] * (c.ndim - 2) + ([width - c.shape[1], 0] if left else [0, width - c.shape[1]])
        padded.append(torch.nn.functional.pad(c, pad))
    return torch.cat(padded)


def load_or_encode(text, ae, space: ImageLatentSpace, out: Path, num: int, seed: int) -> dict:
    """The run's encoded training set: ``out/data.safetensors`` if present, else encoded now and written."""
    from safetensors.torch import load_file, save_file

    if (out / DATA).is_file():
        return load_file(str(out / DATA))
    data = encode_dataset(text, ae, space, num, seed)
    save_file({k: v.contiguous() for k, v in data.items()}, str(out / DATA))
    return data


def build_prior(args, text, ae):
    """LoRA (rank ``args.rank``) + projections for the autoencoder's latent space on the text DiT: fresh, or
    the trainable weights of the adapter folder ``args.init_adapter`` (a warm start)."""
    space = ImageLatentSpace.from_autoencoder(ae, patch_size=args.patch_size)
    if args.init_adapter:
        adapter = warm_start(args, text.transformer, space)
    else:
        adapter = add_image_adapter(text.transformer, space, r=args.rank)
    return space, adapter, MultimodalPrior(text.transformer, {"image": adapter})


def warm_start(args, transformer, space: ImageLatentSpace):
    """Load ``args.init_adapter`` (same latent space and rank, else a ``ValueError`` naming both) as trainable."""
    folder = Path(args.init_adapter)
    adapter = load_image_adapter(transformer, folder, space=space)
    rank = transformer.peft_config[DEFAULT_ADAPTER].r
    if rank != args.rank:
        raise ValueError(f"--init-adapter {folder} has LoRA rank {rank} but --rank is {args.rank}; pass --rank {rank}.")
    for name, param in transformer.named_parameters():
        param.requires_grad_("lora_" in name)
    return adapter.requires_grad_(True)


def learning_rate(args, step: int) -> float:
    """Linear warm-up then cosine decay, a function of the step (exact resume)."""
    return float(args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + np.cos(np.pi * step / args.steps)))


def direction_losses(prior, data: dict, step: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Text → image and image → text flow-matching losses of batch ``step`` (deterministic from the step).

    Each direction has its own timestep density: the image block is conditioned on the caption and
    learns to read it mostly at high noise, where the caption is the only information
    (``--t2i-logit-loc``; the official pretraining loc 1.0), while captions keep the text default."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    idx = torch.randint(data["image"].shape[0], (args.batch_size,), generator=gen)
    t2i, _ = flow_matching_loss_image(prior, data["prompt"][idx], data["image"][idx], "text_to_image",
                                      data["prompt_valid"][idx], cfg=FlowMatchingConfig(logit_loc=args.t2i_logit_loc),
                                      drop_condition_prob=args.drop_prob, generator=gen)
    i2t, _ = flow_matching_loss_image(prior, data["caption"][idx], data["image"][idx], "image_to_text",
                                      data["caption_valid"][idx], cfg=FlowMatchingConfig(logit_loc=args.i2t_logit_loc),
                                      drop_condition_prob=args.drop_prob, generator=gen)
    return t2i, i2t


def train(args) -> None:
    """Flow-matching loop over both directions; atomic accelerate checkpoints, exact resume."""
    from accelerate import Accelerator

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    text, ae = load_bases(args.text_model, args.autoencoder)
    space, _, prior = build_prior(args, text, ae)
    data = load_or_encode(text, ae, space, out, args.num_train, args.seed)
    params = [p for p in prior.parameters() if p.requires_grad]
    accelerator = Accelerator(cpu=True)
    prior, optimizer = accelerator.prepare(prior, torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0))
    state = load_latest_checkpoint(accelerator, out) or {"step": 0, "elapsed": 0.0}
    step, start = state["step"], time.time() - state["elapsed"]
    log = open(out / "log.csv", "a")
    stop = min(args.steps, args.stop_at_step or args.steps)
    while step < stop:
        lr = learning_rate(args, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t2i, i2t = direction_losses(prior, data, step, args)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(t2i + args.i2t_weight * i2t)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        if step % args.log_every == 0:
            line = f"{step},{time.time() - start:.1f},{lr:.2e},{t2i.item():.4f},{i2t.item():.4f}"
            log.write(line + "\n")
            log.flush()
            print(line, flush=True)
        if step % args.checkpoint_every == 0 or step == stop:
            save_checkpoint(accelerator, out, step, keep=1, extra={"elapsed": time.time() - start})


def load_trained(args, text, ae):
    """The prior of the latest checkpoint under ``args.out`` (trainable weights) and that checkpoint's state."""
    checkpoint = latest_checkpoint(Path(args.out))
    if checkpoint is None:
        raise FileNotFoundError(f"no complete checkpoint under {Path(args.out) / 'checkpoints'}; train first.")
    space, adapter, prior = build_prior(args, text, ae)
    prior.load_state_dict(load_model_weights(checkpoint))
    return adapter, read_state(checkpoint)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(pipe, captioner, num: int, seed: int, steps: int, guidance: float, split: str = "heldout",
             num_candidates: int = 1) -> dict:
    """Text → image: every attribute of the prompt read back from the image; image → text: every attribute
    of the image named by the caption. Both on ``split`` scenes (held-out compositions by default).
    With ``num_candidates`` > 1, image → text is also scored with that many captions per image reranked
    by the adapter's text → image denoising error (``image_to_text_rerank``)."""
    examples = make_examples(num, seed=seed, split=split, image_size=pipe.image_size)
    gen = torch.Generator().manual_seed(seed)
    images = pipe([e.caption for e in examples], num_inference_steps=steps, guidance_scale=guidance,
                  generator=gen, output_type="np").images
    t2i = [score((im * 255).round().astype(np.uint8), e.scene) for im, e in zip(images, examples)]
    texts = captioner([e.image for e in examples], num_inference_steps=steps, guidance_scale=guidance,
                      generator=gen).texts
    i2t = [score_caption(t, e.scene) for t, e in zip(texts, examples)]

    def mean(rows):
        keys = sorted({k for r in rows for k in r})
        return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}

    samples = [{"caption": e.caption, "generated_caption": t} for e, t in zip(examples[:8], texts[:8])]
    metrics = {"split": split, "num": num, "steps": steps, "guidance_scale": guidance,
               "text_to_image": mean(t2i), "image_to_text": mean(i2t), "samples": samples}
    if num_candidates > 1:
        best = captioner([e.image for e in examples], num_inference_steps=steps, guidance_scale=guidance,
                         generator=gen, num_candidates=num_candidates).texts
        metrics["image_to_text_rerank"] = {"num_candidates": num_candidates,
                                           **mean([score_caption(t, e.scene) for t, e in zip(best, examples)])}
    return metrics


GRID_PROMPTS = (  # held-out compositions (yellow circle, magenta square, cyan triangle, red cross) first
    "a small yellow circle on the left", "a large magenta square in the center", "a large cyan triangle at the top",
    "a small red cross at the bottom", "a large blue square above a small green triangle",
    "a small red circle to the left of a large yellow cross",
)
GRID_SCALE = 4  # nearest-neighbour upscaling of the 32×32 images in the grid


@torch.no_grad()
def save_grid(pipe, path, prompts=GRID_PROMPTS, per_prompt: int = 4, steps: int = 16, guidance: float = 3.0):
    """PNG grid: one row per prompt, ``per_prompt`` samples each (seeded), upscaled for viewing."""
    from PIL import Image

    images = pipe(list(prompts), num_images_per_prompt=per_prompt, num_inference_steps=steps,
                  guidance_scale=guidance, generator=torch.Generator().manual_seed(0)).images
    side = images[0].width * GRID_SCALE
    grid = Image.new("RGB", (per_prompt * side, len(prompts) * side), (40, 40, 40))
    for i, image in enumerate(images):
        grid.paste(image.resize((side, side), Image.Resampling.NEAREST), ((i % per_prompt) * side, (i // per_prompt) * side))
    grid.save(path)


def export(args) -> None:
    """Checkpoint → adapter folder (PEFT + projections) and, with ``--pipeline``, a fused image pipeline; evaluate."""
    from ..pipelines import ColaCaptionPipeline, ColaImagePriorPipeline

    text, ae = load_bases(args.text_model, args.autoencoder)
    adapter, state = load_trained(args, text, ae)
    save_image_adapter(text.transformer, adapter, args.export)
    pipe = ColaImagePriorPipeline(vae=text.vae, transformer=text.transformer, image_adapter=adapter.eval(),
                                  autoencoder=ae, scheduler=text.scheduler, tokenizer=text.tokenizer)
    pipe.set_progress_bar_config(disable=True)
    metrics = {"step": state["step"], "wall_time_s": round(state["elapsed"])}
    captioner = ColaCaptionPipeline(**pipe.components)
    for guidance in args.eval_guidance:
        for split, seed in (("heldout", 2024), ("train", 777)):
            key = f"{split}_cfg{guidance:g}"
            metrics[key] = evaluate(pipe, captioner, args.eval_num, seed, args.eval_steps, guidance, split=split,
                                    num_candidates=args.eval_candidates)
            print(key, json.dumps({k: v for k, v in metrics[key].items() if k.startswith(("text_to", "image_to"))}),
                  flush=True)
    Path(args.export, "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    save_grid(pipe, Path(args.export) / "grid.png", steps=args.eval_steps)
    if args.pipeline:
        pipe.fuse_image_adapter()
        pipe.save_pretrained(args.pipeline)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text-model", required=True, help="ColaPipeline folder whose text VAE + DiT know the captions")
    p.add_argument("--autoencoder", required=True, help="diffusers AutoencoderKL folder (shapes world)")
    p.add_argument("--out", required=True, help="run folder (data.safetensors, checkpoints/, log.csv); resumes from its latest checkpoint")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step (both directions each)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (LoRA + projections)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then cosine decay")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank on the DiT trunk")
    p.add_argument("--init-adapter", default=None,
                   help="adapter folder (from --export) whose LoRA + projections start the run instead of fresh ones")
    p.add_argument("--patch-size", type=int, default=2, help="latent pixels per image token side")
    p.add_argument("--num-train", type=int, default=8000, help="training scenes, encoded once")
    p.add_argument("--drop-prob", type=float, default=0.1, help="condition dropout (trains the CFG uncond branch)")
    p.add_argument("--i2t-weight", type=float, default=1.0, help="weight of the image → text loss")
    p.add_argument("--t2i-logit-loc", type=float, default=1.0, help="logit-normal timestep loc of the text → image loss")
    p.add_argument("--i2t-logit-loc", type=float, default=0.0, help="logit-normal timestep loc of the image → text loss")
    p.add_argument("--seed", type=int, default=0, help="seed of data, init and batches")
    p.add_argument("--log-every", type=int, default=25, help="steps between log lines")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--stop-at-step", type=int, default=0, help="stop (with a checkpoint) at this step; the LR horizon stays --steps")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--export", default=None, help="write the checkpoint's adapter here and evaluate (no training)")
    p.add_argument("--pipeline", default=None, help="with --export: also save a fused image pipeline folder here")
    p.add_argument("--eval-num", type=int, default=200, help="held-out scenes per evaluation")
    p.add_argument("--eval-steps", type=int, default=16, help="solver steps per block in evaluation")
    p.add_argument("--eval-candidates", type=int, default=16,
                   help="captions per image for the reranked image → text score (1 skips it)")
    p.add_argument("--eval-guidance", type=float, nargs="+", default=[1.0, 3.0], help="CFG scales to evaluate")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    export(args) if args.export else train(args)


if __name__ == "__main__":
    main()
