"""``colabridge`` command line: generate, convert, train, eval, imagine, caption."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .paths import default_text_model


def _prompts(args) -> tuple[list[str], list]:
    """Prompts from positional arguments and/or a JSONL file (``question``/``context``/``choices``/``id``)."""
    from .eval.templates import prompt_from_record

    prompts, ids = list(args.prompt), list(range(len(args.prompt)))
    if args.file:
        for line_no, line in enumerate(Path(args.file).read_text().splitlines()):
            if not line.strip():
                continue
            record = json.loads(line)
            prompts.append(prompt_from_record(record, args.task))
            ids.append(record.get("id", len(ids)))
    if not prompts:
        raise SystemExit("colabridge generate: give at least one prompt or --file FILE.jsonl")
    return prompts, ids


def cmd_generate(args) -> None:
    import torch

    from .pipelines import ColaPipeline

    pipe = ColaPipeline.from_pretrained(args.model or default_text_model())
    pipe.set_progress_bar_config(disable=True)
    if args.lora:
        pipe.load_lora_weights(args.lora)
        pipe.fuse_lora(lora_scale=args.lora_scale)
    elif args.lora_scale != 1.0:
        raise SystemExit("colabridge generate: --lora-scale needs --lora PATH")
    prompts, ids = _prompts(args)
    generator = torch.Generator().manual_seed(args.seed)
    stream = pipe.stream(prompts, max_new_tokens=args.max_new_tokens, num_inference_steps=args.steps,
                         guidance_scale=args.guidance_scale, temperature=args.temperature, generator=generator,
                         noise_seed=args.noise_seed, sample_ids=ids, clamp_below=args.clamp_below,
                         sub_block_size=args.sub_block_size)
    if len(prompts) == 1:  # one prompt: print text as blocks arrive
        sys.stdout.write(prompts[0])
        for chunk in stream:
            sys.stdout.write(chunk.texts[0])
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    texts = [""] * len(prompts)
    for chunk in stream:
        texts = [t + d for t, d in zip(texts, chunk.texts)]
        print(f"[block {chunk.block_index}] " + " | ".join(repr(d) for d in chunk.texts), file=sys.stderr)
    for i, prompt, text in zip(ids, prompts, texts):
        print(json.dumps({"id": i, "prompt": prompt, "generate": text}, ensure_ascii=False))


def cmd_convert(args) -> None:
    from . import convert

    if args.to == "diffusers":
        out = convert.official_to_diffusers(args.src, args.dst, overwrite=args.overwrite, allow_pickle=args.allow_pickle)
    else:
        shard = int(args.max_shard_mb * 2**20) if args.max_shard_mb else None
        out = convert.diffusers_to_official(args.src, args.dst, overwrite=args.overwrite, max_shard_bytes=shard)
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colabridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with a Cola pipeline")
    gen.add_argument("prompt", nargs="*", help="prompt(s); several prompts run as one batch")
    gen.add_argument("--model", help="pipeline folder (diffusers or official layout); default: the embedded model")
    gen.add_argument("--file", help="JSONL file of prompts (fields question/context/choices/id)")
    gen.add_argument("--task", default="lambada", help="prompt template for --file records (official task names)")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="token budget (whole blocks)")
    gen.add_argument("--steps", type=int, default=16, help="Euler steps per block")
    gen.add_argument("--guidance-scale", type=float, default=7.0, help="classifier-free guidance scale")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--seed", type=int, default=0, help="seed of the generator (noise and sampling)")
    gen.add_argument("--noise-seed", type=int, default=None, help="official per-sample noise seed")
    gen.add_argument("--clamp-below", type=float, default=None,
                     help="Diffusion-LM clamping for noise levels σ ≤ this (Euler; 0 = off; default: the model's config)")
    gen.add_argument("--sub-block-size", type=int, default=None,
                     help="generate each block in sequential passes of this many tokens (default: the model's config)")
    gen.add_argument("--lora", help="PEFT LoRA adapter folder for the DiT (e.g. adapters/cola-tiny-en-austen-lora)")
    gen.add_argument("--lora-scale", type=float, default=1.0, help="strength of --lora (fused into the weights)")
    gen.set_defaults(func=cmd_generate)

    conv = sub.add_parser("convert", help="convert between the official release layout and the diffusers layout")
    conv.add_argument("src", help="source folder")
    conv.add_argument("dst", help="destination folder (must not exist or be empty, unless --overwrite)")
    conv.add_argument("--to", choices=("diffusers", "official"), required=True, help="target layout")
    conv.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    conv.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin pickles (trusted sources only)")
    conv.add_argument("--max-shard-mb", type=float, default=None, help="shard the official DiT weights above this size")
    conv.set_defaults(func=cmd_convert)
    from .training.cli import add_train_parser  # `colabridge train vae|joint --config FILE.json`
    add_train_parser(sub)
    from .eval.harness import add_eval_parser  # `colabridge eval`
    add_eval_parser(sub)
    from .image_cli import add_image_commands  # `colabridge imagine`, `colabridge caption`
    add_image_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
