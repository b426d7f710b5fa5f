"""Train a small diffusers ``AutoencoderKL`` on the shapes world and measure attribute preservation.

Reads top to bottom: config → data → model → loop (checkpoints, exact resume) → evaluation → export.

The autoencoder sees only the ``"train"`` split (no held-out (shape, colour) pair); preservation is
measured on ``"heldout"`` scenes with the exact readers of :mod:`colabridge.data.shapes`: a
reconstruction preserves a scene when :func:`~colabridge.data.shapes.score` reads back every attribute
(count, colour, shape, size, position/relation).

Usage::

    python -m colabridge.data.train_shapes_autoencoder --out runs/shapes-ae --steps 4000
    python -m colabridge.data.train_shapes_autoencoder --out runs/shapes-ae --export pipelines/shapes-autoencoder
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from ..training.checkpointing import (
    GeneratorState, checkpoint_dir, latest_checkpoint, load_latest_checkpoint, load_model_weights, read_state,
    save_checkpoint,
)
from .shapes import make_examples, score

IMAGE_SIZE = 32


def build_autoencoder(block_out_channels=(32, 64), latent_channels: int = 4, layers_per_block: int = 1,
                      norm_num_groups: int = 16, image_size: int = IMAGE_SIZE) -> AutoencoderKL:
    """SD-style ``AutoencoderKL``; downsampling is ``2 ** (len(block_out_channels) − 1)``."""
    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, latent_channels=latent_channels, norm_num_groups=norm_num_groups,
        sample_size=image_size,
    )


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 → ``(B, 3, H, W)`` float in [-1, 1] (diffusers' convention)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in about [-1, 1] → ``(B, H, W, 3)`` uint8."""
    x = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def batch(step: int, size: int, seed: int) -> torch.Tensor:
    """Training batch ``step``: fresh ``"train"`` scenes, deterministic from (seed, step) for exact resume."""
    examples = make_examples(size, seed=seed * 1_000_003 + step, split="train", image_size=IMAGE_SIZE)
    return to_pixels(np.stack([e.image for e in examples]))


def loss_fn(vae: AutoencoderKL, pixels: torch.Tensor, kl_weight: float, generator: torch.Generator):
    """MSE of a posterior-sample reconstruction + ``kl_weight`` · KL(q(z|x) ‖ N(0, I)) per latent element."""
    posterior = vae.encode(pixels).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    mse = torch.nn.functional.mse_loss(recon, pixels)
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return mse + kl_weight * kl, {"mse": mse.item(), "kl": kl.item()}


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Posterior-mode reconstructions of ``(B, H, W, 3)`` uint8 images, as uint8."""
    out = []
    for i in range(0, len(images), batch_size):
        pixels = to_pixels(images[i: i + batch_size]).to(vae.device, vae.dtype)
        out.append(to_uint8(vae.decode(vae.encode(pixels).latent_dist.mode()).sample))
    return np.concatenate(out)


def attribute_preservation(vae: AutoencoderKL, num: int = 500, seed: int = 12345, split: str = "heldout") -> dict:
    """Share of ``split`` scenes whose reconstruction reads back each attribute (and ``all``)."""
    examples = make_examples(num, seed=seed, split=split, image_size=IMAGE_SIZE)
    recon = reconstruct(vae, np.stack([e.image for e in examples]))
    rows = [score(r, e.scene) for r, e in zip(recon, examples)]
    keys = sorted({k for r in rows for k in r})
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys} | {"num": num, "split": split}


@torch.no_grad()
def latent_stats(vae: AutoencoderKL, num: int = 1000, seed: int = 4321) -> tuple[float, float]:
    """``(shift_factor, scaling_factor)`` = (mean, 1/std) of posterior-mode latents of ``"train"`` scenes,
    so ``(z − shift)·scaling`` has zero mean and unit variance for the prior (diffusers' convention)."""
    images = np.stack([e.image for e in make_examples(num, seed=seed, split="train", image_size=IMAGE_SIZE)])
    latents = torch.cat([vae.encode(to_pixels(images[i: i + 250])).latent_dist.mode() for i in range(0, num, 250)])
    return float(latents.mean()), float(1.0 / latents.std())


def learning_rate(args, step: int) -> float:
    """Cosine decay after a short warm-up; derived from the step so resume is exact. A Python float: the
    optimizer state (where the LR lives) is reloaded with ``torch.load(weights_only=True)``."""
    warm = min(1.0, (step + 1) / args.warmup)
    return float(args.lr * warm * 0.5 * (1 + np.cos(np.pi * step / args.steps)))


def prepare_run(args, out: Path):
    """Model, optimizer and noise generator behind an ``Accelerator``; resumed from the latest checkpoint
    of ``out`` when there is one. Returns ``(accelerator, vae, optimizer, generator, step, elapsed)``."""
    from accelerate import Accelerator

    torch.manual_seed(args.seed)
    vae = build_autoencoder(args.block_out_channels, args.latent_channels, args.layers_per_block)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    accelerator = Accelerator(cpu=True)
    vae, optimizer = accelerator.prepare(vae, optimizer)
    accelerator.register_for_checkpointing(GeneratorState(generator))  # posterior noise resumes mid-stream
    state = load_latest_checkpoint(accelerator, out)
    if state is None:
        return accelerator, vae, optimizer, generator, 0, 0.0
    print(f"resumed at step {state['step']}", flush=True)
    return accelerator, vae, optimizer, generator, state["step"], state["elapsed"]


def train(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    accelerator, vae, optimizer, generator, step, elapsed = prepare_run(args, out)
    log = open(out / "log.csv", "a")
    start = time.time() - elapsed
    vae.train()
    while step < args.steps:
        lr = learning_rate(args, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, stats = loss_fn(vae, batch(step, args.batch_size, args.seed), args.kl_weight, generator)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % args.log_every == 0:
            log.write(f"{step},{time.time() - start:.1f},{lr:.2e},{stats['mse']:.5f},{stats['kl']:.4f}\n")
            log.flush()
            print(f"step {step} t={time.time() - start:.0f}s mse={stats['mse']:.5f} kl={stats['kl']:.3f}", flush=True)
        if step % args.checkpoint_every == 0 or step == args.steps:
            extra = {"elapsed": time.time() - start, "config": dict(vae.config)}
            save_checkpoint(accelerator, out, step, keep=1, extra=extra)
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(vae, args.eval_num, step, out)


def evaluate(vae: AutoencoderKL, num: int, step: int, out: Path) -> None:
    """Held-out attribute preservation, printed and appended to ``out/eval.jsonl``."""
    vae.eval()
    metric = attribute_preservation(vae, num)
    vae.train()
    print(f"step {step} heldout preservation {json.dumps(metric)}", flush=True)
    with open(out / "eval.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **metric}) + "\n")


def load_checkpoint_model(out: Path) -> tuple[AutoencoderKL, dict]:
    """The autoencoder of the latest checkpoint under ``out`` (eval mode) and the checkpoint's state."""
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoint_dir(out)}; train with --out {out} first.")
    state = read_state(checkpoint)
    vae = AutoencoderKL.from_config(state["config"])
    vae.load_state_dict(load_model_weights(checkpoint))
    return vae.eval(), state


def export(args) -> None:
    """Checkpoint → diffusers folder (fp16 weights, latent shift/scale measured) + ``metrics.json``
    (attribute preservation of the fp32 model and of the fp16 weights, held-out and train scenes)."""
    vae, state = load_checkpoint_model(Path(args.out))
    fp32 = attribute_preservation(vae, args.eval_num)
    vae16 = load_checkpoint_model(Path(args.out))[0]
    vae16 = vae16.to(torch.float16).to(torch.float32).eval()  # what a user gets loading the fp16 file in fp32
    fp16 = attribute_preservation(vae16, args.eval_num)
    train_split = attribute_preservation(vae16, args.eval_num, split="train", seed=777)
    shift, scale = latent_stats(vae)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    vae.to(torch.float16).save_pretrained(args.export)
    metrics = {"step": state["step"], "wall_time_s": round(state["elapsed"]), "shift_factor": shift,
               "scaling_factor": scale, "heldout_fp32": fp32,
               "heldout_fp16_weights": fp16, "train_fp16_weights": train_split}
    Path(args.export, "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="run folder (checkpoints/, log.csv, eval.jsonl); resumes from its latest checkpoint")
    p.add_argument("--steps", type=int, default=4000, help="total optimiser steps")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (fresh train-split scenes)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the per-element KL term")
    p.add_argument("--block-out-channels", type=int, nargs="+", default=[32, 64],
                   help="channels per level; downsampling = 2**(levels-1)")
    p.add_argument("--latent-channels", type=int, default=4, help="latent channels")
    p.add_argument("--layers-per-block", type=int, default=1, help="resnet layers per level")
    p.add_argument("--seed", type=int, default=0, help="seed of data and init")
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    p.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints")
    p.add_argument("--eval-every", type=int, default=1000, help="steps between held-out evaluations")
    p.add_argument("--eval-num", type=int, default=500, help="held-out scenes per evaluation")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--export", default=None, help="write the latest checkpoint as a diffusers folder here instead of training")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    export(args) if args.export else train(args)


if __name__ == "__main__":
    main()
