"""``colabridge imagine`` (prompt → PNG), ``colabridge caption`` (image → text) and ``colabridge clip-prior``
(prompt → CLIP image embeddings in a safetensors file).

``--model`` is an image pipeline folder (``ColaImagePriorPipeline.save_pretrained``); or a text
pipeline folder with ``--adapter`` (image adapter folder) and ``--autoencoder`` (``AutoencoderKL`` folder).
Without any of them, the embedded shapes-world model (:data:`DEFAULT_PARTS`) is used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .paths import artifact_root

# embedded default: the shapes text model + its image adapter + the shapes autoencoder
DEFAULT_PARTS = ("pipelines/shapes-text", "adapters/shapes-image", "pipelines/shapes-autoencoder")
# embedded default of clip-prior: the shapes text model + its CLIP-prior adapter + the shapes CLIP
DEFAULT_CLIP_PARTS = ("pipelines/shapes-text", "adapters/shapes-clip-prior", "pipelines/shapes-clip")


def default_parts(parts: tuple[str, str, str] = DEFAULT_PARTS) -> tuple[Path, Path, Path]:
    paths = tuple(artifact_root() / part for part in parts)
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        raise SystemExit(f"embedded image model missing ({', '.join(missing)}); pass --model DIR (with "
                         "--adapter/--autoencoder for a text pipeline folder).")
    return paths


def _load(cls, args):
    from .pipelines.pipeline_image import load_image_pipeline

    if args.model is None and args.adapter is None and args.autoencoder is None:
        model, adapter, autoencoder = default_parts()
    else:
        model, adapter, autoencoder = args.model, args.adapter, args.autoencoder
        if model is None:
            raise SystemExit(f"colabridge {args.command}: --adapter/--autoencoder need --model (a text pipeline folder).")
    try:
        pipe = load_image_pipeline(cls, model, adapter, autoencoder)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"colabridge {args.command}: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _output_paths(out: str, count: int) -> list[Path]:
    """``out`` for one image; ``stem-0.png``, ``stem-1.png``, … for several."""
    path = Path(out)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]


def cmd_imagine(args) -> None:
    import torch

    from .pipelines import ColaImagePriorPipeline

    pipe = _load(ColaImagePriorPipeline, args)
    try:
        out = pipe(args.prompt, num_images_per_prompt=args.num_images, num_inference_steps=args.steps,
                   guidance_scale=args.guidance_scale, generator=torch.Generator().manual_seed(args.seed))
    except (TypeError, ValueError) as err:
        raise SystemExit(f"colabridge imagine: {err}") from err
    for image, path in zip(out.images, _output_paths(args.output, len(out.images))):
        path.parent.mkdir(parents=True, exist_ok=True)
        if args.scale > 1:  # nearest-neighbour upscaling keeps the pixels of a 32×32 image visible
            image = image.resize((image.width * args.scale, image.height * args.scale), resample=0)
        image.save(path)
        print(path)


def cmd_caption(args) -> None:
    import torch
    from PIL import Image

    from .pipelines import ColaCaptionPipeline

    pipe = _load(ColaCaptionPipeline, args)
    images = []
    for name in args.image:
        try:
            images.append(Image.open(name))
        except (FileNotFoundError, OSError) as err:
            raise SystemExit(f"colabridge caption: cannot read {name}: {err}") from err
    try:
        out = pipe(images, max_new_tokens=args.max_new_tokens, num_inference_steps=args.steps,
                   guidance_scale=args.guidance_scale, generator=torch.Generator().manual_seed(args.seed),
                   num_candidates=args.num_candidates)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"colabridge caption: {err}") from err
    if len(images) == 1:
        print(out.texts[0])
        return
    for name, text in zip(args.image, out.texts):
        print(json.dumps({"image": name, "caption": text}, ensure_ascii=False))


def cmd_clip_prior(args) -> None:
    import torch
    from safetensors.torch import save_file

    from .pipelines import ColaClipPriorPipeline

    parts = (args.model, args.adapter, args.clip)
    if any(p is not None for p in parts) and not all(p is not None for p in parts):
        raise SystemExit("colabridge clip-prior: pass all of --model, --adapter and --clip, or none (embedded default).")
    try:
        pipe = ColaClipPriorPipeline.from_parts(*(parts if parts[0] else default_parts(DEFAULT_CLIP_PARTS)))
        pipe.set_progress_bar_config(disable=True)
        out = pipe(args.prompt, num_images_per_prompt=args.num_images, num_inference_steps=args.steps,
                   guidance_scale=args.guidance_scale, generator=torch.Generator().manual_seed(args.seed))
    except (FileNotFoundError, TypeError, ValueError) as err:
        raise SystemExit(f"colabridge clip-prior: {err}") from err
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    tensors = {"image_embeds": out.image_embeds, "negative_image_embeds": out.negative_image_embeds}
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.output, metadata={"prompt": args.prompt})
    print(f"{args.output}: image_embeds {tuple(out.image_embeds.shape)}, negative_image_embeds "
          f"{tuple(out.negative_image_embeds.shape)}")


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="image pipeline folder, or a text pipeline folder with --adapter/--autoencoder "
                                   f"(default: {' + '.join(DEFAULT_PARTS)})")
    p.add_argument("--adapter", help="image adapter folder (PEFT LoRA + projections/) for a text pipeline --model")
    p.add_argument("--autoencoder", help="diffusers AutoencoderKL folder, with --adapter")
    p.add_argument("--steps", type=int, default=16, help="solver steps per block")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (and token sampling)")


def add_image_commands(subparsers) -> None:
    """Add ``imagine`` and ``caption`` to a ``colabridge`` subparsers object."""
    imagine = subparsers.add_parser("imagine", help="generate an image from a prompt (text → image prior)")
    imagine.add_argument("prompt", help="the prompt, e.g. \"a small red circle on the left\"")
    imagine.add_argument("-o", "--output", default="out.png", help="PNG path (stem-<i>.png for several images)")
    imagine.add_argument("-n", "--num-images", type=int, default=1, help="images for the prompt")
    imagine.add_argument("--scale", type=int, default=1, help="nearest-neighbour upscaling factor of the saved PNG")
    _model_arguments(imagine)
    imagine.set_defaults(func=cmd_imagine)

    caption = subparsers.add_parser("caption", help="caption image(s) (image → text)")
    caption.add_argument("image", nargs="+", help="image file(s) at the autoencoder's size, RGB")
    caption.add_argument("--max-new-tokens", type=int, default=24, help="caption token budget (whole blocks)")
    caption.add_argument("--num-candidates", type=int, default=16,
                         help="captions sampled per image; the one whose text → image denoising error on the image "
                              "is lowest is printed (1 = a single sample)")
    _model_arguments(caption)
    caption.set_defaults(func=cmd_caption)

    prior = subparsers.add_parser("clip-prior", help="prompt → CLIP image embeddings (Kandinsky-style prior)")
    prior.add_argument("prompt", help="the prompt, e.g. \"a red circle\"")
    prior.add_argument("-o", "--output", default="embeds.safetensors", help="safetensors file (image_embeds, "
                                                                           "negative_image_embeds)")
    prior.add_argument("-n", "--num-images", type=int, default=1, help="embeddings for the prompt")
    prior.add_argument("--model", help="text pipeline folder (with --adapter and --clip; default: "
                                       f"{' + '.join(DEFAULT_CLIP_PARTS)})")
    prior.add_argument("--adapter", help="CLIP-prior adapter folder (PEFT LoRA + projections/)")
    prior.add_argument("--clip", help="ColaClipEmbedder folder (config.json, safetensors, tokenizer/)")
    prior.add_argument("--steps", type=int, default=16, help="solver steps for the embedding block")
    prior.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    prior.add_argument("--seed", type=int, default=0, help="seed of the noise")
    prior.set_defaults(func=cmd_clip_prior)
