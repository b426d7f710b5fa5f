"""Text ↔ image through the shared block engine: ``ColaImagePriorPipeline`` and ``ColaCaptionPipeline``.

Both run the Cola DiT trunk as a :class:`~colabridge.adapters.MultimodalPrior` (text tokens through
the DiT's own projections, image tokens through an :class:`~colabridge.adapters.ImageAdapter`; the
trunk carries the adapter's LoRA) and transport blocks with :func:`~colabridge.sampling.transport_block`
under history-vs-alone CFG (spec §5.4 step 3) — no second sampler.

* text → image: the prompt's text latents (text VAE, padded to whole blocks) are prefilled into the
  prior's history; ONE image block (all image tokens, bidirectional) is transported; the diffusers
  ``AutoencoderKL`` decodes it.
* image → text: the image's tokens are prefilled as one image block; caption blocks follow, each
  transported, decoded by the text VAE's cached decoder, turned into ids and committed, as in
  :class:`~colabridge.ColaPipeline`. With ``num_candidates`` > 1 several captions are sampled and the
  one the adapter's *other* direction finds most likely is kept: the text → image flow-matching error
  of the image's latents after each caption, at fixed timesteps and shared noise
  (:meth:`ColaCaptionPipeline.score_captions`, a diffusion classifier as in Li et al. 2023, "Your
  Diffusion Model is Secretly a Zero-Shot Classifier").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedTokenizerBase

from ..adapters import ImageAdapter, MultimodalPrior, fuse_image_adapter, load_image_adapter, text_to_image_errors
from ..adapters.multimodal import TEXT
from ..data.images import pixel_batch
from ..models import ColaDiT, ColaTextVAE
from ..sampling.engine import CachedStream, guided_velocity, packed_guided_velocity, transport_block
from ..sampling.solvers import get_solver
from ..sampling.tokens import select_tokens
from .pipeline_cola import ColaPipeline, _is_int, check_components
from .prompting import pad_to_blocks

IMAGE = "image"  # the adapter's modality name inside the MultimodalPrior
IMAGE_OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CAPTION_OUTPUT_TYPES = ("text", "ids", "latent")
MAX_NUM_IMAGES_PER_PROMPT = 64
MAX_NUM_CANDIDATES = 64
SCORE_CHUNK = 256  # (caption, image) pairs per scoring forward


@dataclass
class ColaImagePipelineOutput(BaseOutput):
    """Output of :class:`ColaImagePriorPipeline`.

    Attributes:
        images: ``B·num_images_per_prompt`` images (list of PIL, ``(B, S, S, 3)`` float array in [0, 1],
            or ``(B, 3, S, S)`` tensor in [0, 1]); ``None`` for ``output_type="latent"``.
        latents: ``(B, c, h, w)`` transported image latents, normalised as the prior sees them
            (``autoencoder.decode(latents / scaling_factor + shift_factor)`` gives the image).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None
    latents: torch.Tensor


@dataclass
class ColaCaptionPipelineOutput(BaseOutput):
    """Output of :class:`ColaCaptionPipeline`.

    Attributes:
        texts: decoded captions (up to the first stop id, special tokens skipped); ``None`` unless ``"text"``.
        sequences: generated ids per image, up to (excluding) the first stop id; ``None`` for ``"latent"``.
        latents: ``(B, n_blocks·block_size, C)`` transported caption latents.
        finished: ``(B,)`` whether each caption produced a stop id.
        scores: ``(B,)`` the chosen caption's text → image denoising error when ``num_candidates > 1``
            (lower explains the image better), else ``None``.
    """

    texts: list[str] | None
    sequences: list[list[int]] | None
    latents: torch.Tensor
    finished: torch.BoolTensor
    scores: torch.Tensor | None = None


def check_image_components(transformer: ColaDiT, image_adapter: ImageAdapter, autoencoder: AutoencoderKL) -> None:
    """The adapter must project to the DiT's width and read the autoencoder's latent space (errors name both)."""
    if image_adapter.config.txt_dim != transformer.config.txt_dim:
        raise ValueError(f"image_adapter projects to txt_dim={image_adapter.config.txt_dim} but the transformer has "
                         f"txt_dim={transformer.config.txt_dim}; use an adapter trained for this transformer.")
    image_adapter.space.check_autoencoder(autoencoder)
    if image_adapter.num_tokens % transformer.config.block_size:
        raise ValueError(f"the image makes {image_adapter.num_tokens} tokens, not a multiple of the DiT "
                         f"block_size={transformer.config.block_size}.")


def left_align(latents: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's valid tokens ``(B, L, C)`` (``mask`` ``(B, L)``, valid first) to the end.

    Left padding puts every sample's last prompt token right before the block that follows, as the
    prior's history needs (:meth:`CachedStream.prefill` numbers valid tokens only).
    """
    out, valid = torch.zeros_like(latents), torch.zeros_like(mask)
    for i, n in enumerate(mask.sum(1).tolist()):
        if n:
            out[i, -n:], valid[i, -n:] = latents[i, :n], True
    return out, valid  # (B, L, C), (B, L)


def encode_captions(vae: ColaTextVAE, tokenizer, texts: list[str], block_size: int, pad_token_id: int,
                    left: bool = True):
    """Captions → normalised text latents ``(B, L, C)`` (posterior mode) and ``valid`` ``(B, L)``.

    Each caption is padded with ``pad_token_id`` to whole blocks (the pads are encoder input, as in
    :class:`ColaPipeline`), so the block after it starts at a block boundary. ``left`` aligns the
    captions to the end (a history before an image block); otherwise they start at 0 (captions that
    follow an image). Shared by the pipelines and adapter training so both see the same layout.
    """
    ids = [list(x) for x in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
    device = vae.device
    if not any(ids):  # only "" texts: one all-invalid block (an empty history), since the VAE needs >= 1 token
        return (torch.zeros(len(ids), block_size, vae.config.latent_dim, device=device),
                torch.zeros(len(ids), block_size, dtype=torch.bool, device=device))
    input_ids, mask = pad_to_blocks(ids, block_size, pad_token_id)
    latents = vae.normalize(vae.encode(input_ids.to(device), mask.to(device)).mode().float())  # (B, L, C)
    return left_align(latents, mask.to(device)) if left else (latents, mask.to(device))


class PriorSamplingMixin:
    """The prior, input checks, history streams and guided block transport shared by the pipelines that
    sample a block of an adapter's modality through the shared engine.

    A pipeline names its adapter component (``adapter_component``) and that adapter's modality inside
    the :class:`MultimodalPrior` (``modality``); it needs ``transformer``, ``scheduler`` components.
    """

    adapter_component: str = "image_adapter"
    modality: str = IMAGE

    @property
    def adapter(self) -> ImageAdapter:
        return getattr(self, self.adapter_component)

    @property
    def prior(self) -> MultimodalPrior:
        """The trunk with the adapter routed per token (built on demand: components may be swapped)."""
        return MultimodalPrior(self.transformer, {self.modality: self.adapter})

    @property
    def space(self):
        return self.adapter.space

    @property
    def block_size(self) -> int:
        return self.transformer.config.block_size

    def fuse_image_adapter(self) -> None:
        """Merge the adapter's LoRA into the DiT weights (same outputs; the pipeline can then be saved)."""
        fuse_image_adapter(self.transformer)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        if getattr(self.transformer, "peft_config", None):
            raise ValueError("the transformer still holds PEFT LoRA layers, which a ColaDiT folder cannot store; "
                             "call pipe.fuse_image_adapter() (or build with from_parts(fuse=True)) first.")
        return super().save_pretrained(save_directory, **kwargs)

    @staticmethod
    def check_sampling(num_inference_steps, guidance_scale, output_type, output_types) -> None:
        checks = [
            (isinstance(num_inference_steps, int) and not isinstance(num_inference_steps, bool)
             and num_inference_steps >= 1, f"`num_inference_steps` must be an int >= 1, got {num_inference_steps!r}."),
            (isinstance(guidance_scale, (int, float)) and np.isfinite(guidance_scale) and guidance_scale >= 0,
             f"`guidance_scale` must be a finite number >= 0 (1 disables guidance), got {guidance_scale!r}."),
            (output_type in output_types, f"`output_type` must be one of {output_types}, got {output_type!r}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def check_prompt_batch(self, batch_size: int, num_images_per_prompt, pad_token_id, latents) -> None:
        """Checks shared by the prompt-conditioned pipelines (``batch_size`` prompts)."""
        if not (isinstance(num_images_per_prompt, int) and 1 <= num_images_per_prompt <= MAX_NUM_IMAGES_PER_PROMPT):
            raise ValueError(f"`num_images_per_prompt` must be an int in [1, {MAX_NUM_IMAGES_PER_PROMPT}], "
                             f"got {num_images_per_prompt!r}.")
        if pad_token_id is None:
            raise ValueError("No pad id: pass `pad_token_id` or use a tokenizer with a pad token.")
        shape = (batch_size * num_images_per_prompt, self.space.num_tokens, self.space.token_dim)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape (batch·num_images_per_prompt, tokens, token_dim) = {shape}, "
                             f"got {tuple(latents.shape)}.")

    def encode_prompt(self, prompts: list[str], num_images_per_prompt: int, pad_token_id: int):
        """Prompt latents ``(B·n, L, C)`` (left-aligned) and ``valid`` ``(B·n, L)``, each prompt repeated ``n`` times."""
        latents, valid = encode_captions(self.vae, self.tokenizer, prompts, self.block_size, pad_token_id)
        return latents.repeat_interleave(num_images_per_prompt, 0), valid.repeat_interleave(num_images_per_prompt, 0)

    def prepare_latents(self, batch_size: int, generator, latents: torch.Tensor | None) -> torch.Tensor:
        """Initial noise ``(B, N, d)`` of the adapter's block (or the user's ``latents``)."""
        if latents is not None:
            return latents.to(self._execution_device, torch.float32)
        shape = (batch_size, self.space.num_tokens, self.space.token_dim)
        return randn_tensor(shape, generator=generator, device=self._execution_device, dtype=torch.float32)

    def new_stream(self, modality: str, batch_size: int) -> CachedStream:
        """An empty prior history whose blocks default to ``modality`` (prefills may pass another)."""
        device = self._execution_device
        return CachedStream(self.prior.for_modality(modality), self.transformer.new_cache(), batch_size, device,
                            self.transformer.dtype)

    def prompt_history(self, modality: str, prompt_latents: torch.Tensor, valid: torch.Tensor) -> CachedStream:
        """Prior history with the prompt latents ``(B, L, C)`` committed at timestep 0; later queries are blocks
        of ``modality``. ``""`` prompts (no valid token) leave an empty history: their block is unconditional."""
        history = self.new_stream(modality, prompt_latents.shape[0])
        if valid.any():
            history.prefill(prompt_latents, valid, torch.zeros(valid.shape, device=valid.device), modality=TEXT)
        return history

    def transport(self, history: CachedStream, noise: torch.Tensor, guidance_scale: float, solver: str,
                  num_inference_steps: int, packed_cfg: bool) -> torch.Tensor:
        """Transport one block ``(B, L, C)`` from noise with history-vs-alone CFG (the shared engine)."""
        method = get_solver(solver)
        scheduler = self.scheduler if isinstance(self.scheduler, method.scheduler_class) else method.make_scheduler()
        scale = torch.full((noise.shape[0],), float(guidance_scale), device=noise.device)
        if packed_cfg:
            velocity = packed_guided_velocity(history.model, history, scale, noise.shape[1])
        else:
            velocity = guided_velocity(history.model, history, scale)
        return transport_block(velocity, noise, scheduler, method.schedule(num_inference_steps))


class _ImageBridgePipeline(PriorSamplingMixin, DiffusionPipeline):
    """Components, loading, checks and history streams shared by the text → image and image → text pipelines."""

    model_cpu_offload_seq = "vae->transformer->autoencoder"

    def __init__(
        self,
        vae: ColaTextVAE,
        transformer: ColaDiT,
        image_adapter: ImageAdapter,
        autoencoder: AutoencoderKL,
        scheduler: FlowMatchEulerDiscreteScheduler,
        tokenizer: PreTrainedTokenizerBase,
    ):
        super().__init__()
        check_components(vae, transformer)
        check_image_components(transformer, image_adapter, autoencoder)
        self.register_modules(vae=vae, transformer=transformer, image_adapter=image_adapter, autoencoder=autoencoder,
                              scheduler=scheduler, tokenizer=tokenizer)
        self.image_processor = VaeImageProcessor(vae_scale_factor=image_adapter.space.downsample, do_resize=False)

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_parts(cls, text_model: str | os.PathLike, adapter: str | os.PathLike, autoencoder: str | os.PathLike,
                   fuse: bool = True, **kwargs):
        """Build from a text pipeline folder (:class:`ColaPipeline`), an image adapter folder and an
        ``AutoencoderKL`` folder. ``fuse`` merges the LoRA into the DiT (needed for ``save_pretrained``)."""
        text = ColaPipeline.from_pretrained(text_model, **kwargs)
        ae = AutoencoderKL.from_pretrained(autoencoder).eval()
        image_adapter = load_image_adapter(text.transformer, adapter)
        image_adapter.space.check_autoencoder(ae)
        if fuse:
            fuse_image_adapter(text.transformer)
        return cls(vae=text.vae, transformer=text.transformer, image_adapter=image_adapter.eval(), autoencoder=ae,
                   scheduler=text.scheduler, tokenizer=text.tokenizer)

    # ------------------------------------------------------------------ properties
    @property
    def image_size(self) -> int:
        return self.space.sample_size


class ColaImagePriorPipeline(_ImageBridgePipeline):
    r"""Prompt → image: a text-conditioned image prior on the Cola DiT, decoded by a diffusers ``AutoencoderKL``.

    Components: ``vae`` (:class:`ColaTextVAE`, encodes the prompt), ``transformer`` (:class:`ColaDiT`
    carrying the image LoRA, fused or injected), ``image_adapter`` (:class:`ImageAdapter`),
    ``autoencoder`` (``AutoencoderKL``), ``scheduler``, ``tokenizer``.
    """

    def check_inputs(self, prompt, num_images_per_prompt, num_inference_steps, guidance_scale, output_type,
                     pad_token_id, latents) -> None:
        items = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, str) for p in items):
            raise TypeError(f"`prompt` must be a str or a non-empty list of str, got {type(prompt).__name__}.")
        self.check_sampling(num_inference_steps, guidance_scale, output_type, IMAGE_OUTPUT_TYPES)
        self.check_prompt_batch(len(items), num_images_per_prompt, pad_token_id, latents)

    def prepare_history(self, prompt_latents: torch.Tensor, valid: torch.Tensor) -> CachedStream:
        """Prior history with the prompt committed at timestep 0; later queries are image blocks."""
        return self.prompt_history(IMAGE, prompt_latents, valid)

    def decode_image(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens ``(B, N, d)`` → pixels ``(B, 3, S, S)`` in about [-1, 1]."""
        return self.space.decode(self.autoencoder, tokens).float()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 16,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        pad_token_id: int | None = None,
        solver: str = "euler",
        packed_cfg: bool = True,
    ):
        r"""Generate images for ``prompt``; returns :class:`ColaImagePipelineOutput`.

        Args:
            prompt: a prompt or a list; words the tokenizer has never seen still encode (byte-level BPE),
                the model has just not learnt them. ``""`` samples unconditionally.
            num_images_per_prompt: images per prompt (independent noise).
            num_inference_steps: solver steps for the image block.
            guidance_scale: CFG ``v = s·(cond − uncond) + uncond``; cond sees the prompt, uncond the image
                block alone; 1 disables guidance.
            generator: ``torch.Generator`` (or one per image) driving the noise.
            latents: initial noise ``(B·n, N, d)`` instead of drawing it.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (skip the autoencoder).
            pad_token_id: pads prompts to whole blocks (default: the tokenizer's pad token).
            solver: ``"euler"`` or ``"heun"``; packed_cfg: cond and uncond in one DiT forward.
        """
        # 0. inputs
        pad_token_id = self.tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        self.check_inputs(prompt, num_images_per_prompt, num_inference_steps, guidance_scale, output_type,
                          pad_token_id, latents)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts) * num_images_per_prompt
        # 1. prompt → text latents; 2. prefill them into the prior history
        prompt_latents, valid = self.encode_prompt(prompts, num_images_per_prompt, pad_token_id)
        history = self.prepare_history(prompt_latents, valid)
        # 3. noise; 4. transport the image block
        noise = self.prepare_latents(batch, generator, latents)
        tokens = self.transport(history, noise, guidance_scale, solver, num_inference_steps, packed_cfg)
        image_latents = self.space.unpatchify(tokens)  # (B, c, h, w), normalised
        # 5. decode; 6. postprocess
        images = None
        if output_type != "latent":
            images = self.image_processor.postprocess(self.decode_image(tokens), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, image_latents
        return ColaImagePipelineOutput(images=images, latents=image_latents)


class ColaCaptionPipeline(_ImageBridgePipeline):
    r"""Image → caption: the image is one block of the prior's history; caption blocks follow.

    Same components as :class:`ColaImagePriorPipeline` (``ColaCaptionPipeline(**image_pipe.components)``).
    """

    def preprocess(self, image) -> torch.Tensor:
        """PIL RGB image(s), ``(H, W, 3)``/``(B, H, W, 3)`` uint8 arrays or ``(B, 3, H, W)`` tensors in [-1, 1]
        → ``(B, 3, S, S)`` float in [-1, 1]. The size must be the autoencoder's (no silent resize)."""
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise ValueError("`image` is an empty list; pass at least one image.")
        pixels = [self._to_pixels(im) for im in images]
        return torch.cat(pixels).to(self._execution_device)

    def _to_pixels(self, image) -> torch.Tensor:
        if isinstance(image, PIL.Image.Image):
            if image.mode != "RGB":
                raise ValueError(f"`image` has mode {image.mode!r}; the autoencoder reads RGB: use image.convert('RGB').")
            image = np.asarray(image)
        return pixel_batch(image, self.image_size, "autoencoder's sample_size", low=-1.0)

    def check_inputs(self, max_new_tokens, num_inference_steps, guidance_scale, temperature, output_type,
                     repetition_penalty, num_candidates=1, score_timesteps=8) -> None:
        self.check_sampling(num_inference_steps, guidance_scale, output_type, CAPTION_OUTPUT_TYPES)
        checks = [
            (isinstance(max_new_tokens, int) and max_new_tokens > 0, f"`max_new_tokens` must be a positive int, got {max_new_tokens!r}."),
            (temperature >= 0, f"`temperature` must be >= 0 (0 = greedy), got {temperature}."),
            (repetition_penalty > 0, f"`repetition_penalty` must be > 0 (1 disables it), got {repetition_penalty}."),
            (_is_count(num_candidates, MAX_NUM_CANDIDATES),
             f"`num_candidates` must be an int in [1, {MAX_NUM_CANDIDATES}] (1 = no reranking), got {num_candidates!r}."),
            _score_timesteps_check(score_timesteps),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, 3, S, S)`` → normalised image tokens ``(B, N, d)`` (posterior mode)."""
        return self.space.encode(self.autoencoder, pixels.to(self.autoencoder.dtype))

    def prepare_history(self, image_tokens: torch.Tensor) -> tuple[CachedStream, CachedStream]:
        """Prior history holding the image block (timestep 0) and an empty text-decoder history."""
        bsz, device = image_tokens.shape[0], image_tokens.device
        prior = self.new_stream(TEXT, bsz)
        valid = torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=device)
        prior.prefill(image_tokens, valid, torch.zeros(valid.shape, device=device), modality=IMAGE)
        decoder = CachedStream(self.vae.decode, self.vae.new_cache(), bsz, device, self.vae.dtype)
        return prior, decoder

    def default_stop_ids(self) -> list[int]:
        return [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []

    @torch.no_grad()
    def __call__(
        self,
        image,
        max_new_tokens: int = 24,
        num_inference_steps: int = 16,
        guidance_scale: float = 3.0,
        temperature: float = 0.0,
        top_k: int | None = 50,
        top_p: float | None = 0.9,
        repetition_penalty: float = 1.0,
        stop_token_ids: list[int] | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "text",
        return_dict: bool = True,
        solver: str = "euler",
        packed_cfg: bool = True,
        num_candidates: int = 1,
        score_timesteps: int = 8,
    ):
        r"""Caption ``image``; returns :class:`ColaCaptionPipelineOutput`.

        Args:
            image: a PIL RGB image, an ``(H, W, 3)`` uint8 array, a ``(3, H, W)`` tensor in [-1, 1], or a
                list/batch of them, at the autoencoder's size.
            max_new_tokens: caption budget, spent in whole blocks.
            num_inference_steps, guidance_scale, solver, packed_cfg: as :class:`ColaImagePriorPipeline`; cond
                sees the image (and earlier caption blocks), uncond the block alone.
            temperature, top_k, top_p, repetition_penalty, generator: token choice (``select_tokens``).
            stop_token_ids: a caption ends at its first stop id (default: the tokenizer's eos).
            output_type: ``"text"``, ``"ids"`` or ``"latent"``.
            num_candidates: captions sampled per image; with more than 1, the one whose text → image
                denoising error on the image is lowest is returned (:meth:`score_captions`, the adapter's
                other direction as a diffusion classifier).
            score_timesteps: timesteps of that error (midpoints of equal bins of (0, 1)).
        """
        # 0. inputs; 1. image → tokens (each repeated per candidate); 2. prefill the image block
        self.check_inputs(max_new_tokens, num_inference_steps, guidance_scale, temperature, output_type,
                          repetition_penalty, num_candidates, score_timesteps)
        image_tokens = self.encode_image(self.preprocess(image))
        prior, decoder = self.prepare_history(image_tokens.repeat_interleave(num_candidates, 0))
        stop = torch.tensor(self.default_stop_ids() if stop_token_ids is None else list(stop_token_ids), dtype=torch.long)
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                        generator=generator)
        # 3. caption blocks
        ids, latents, finished = self.caption_blocks(prior, decoder, -(-max_new_tokens // self.block_size), stop,
                                                     sampling, guidance_scale, solver, num_inference_steps,
                                                     packed_cfg, generator)
        # 4. postprocess; 5. keep the best candidate per image
        if num_candidates == 1:
            output = self.postprocess(ids, latents, finished, stop, output_type)
        else:
            candidates = self.postprocess(ids, latents, finished, stop, "text")
            output = self.choose(candidates, image_tokens, score_timesteps, generator, output_type)
        self.maybe_free_model_hooks()
        return output if return_dict else output.to_tuple()

    def caption_blocks(self, prior, decoder, num_blocks, stop, sampling, guidance_scale, solver, steps, packed_cfg,
                       generator):
        """Transport → decode → choose ids → commit, block by block, until all captions stopped."""
        bsz, device = prior.lengths.shape[0], prior.lengths.device
        shape = (bsz, self.block_size, self.vae.config.latent_dim)
        ids, blocks = None, []
        finished = torch.zeros(bsz, dtype=torch.bool, device=device)
        for _ in range(num_blocks):
            noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
            z = self.transport(prior, noise, guidance_scale, solver, steps, packed_cfg)  # (B, bs, C)
            logits = decoder.query(z, commit=True).float()  # (B, bs, V)
            tokens = select_tokens(logits, ids, **sampling)
            ids = tokens if ids is None else torch.cat((ids, tokens), 1)
            blocks.append(z)
            finished = finished | torch.isin(tokens, stop.to(device)).any(1)
            if bool(finished.all()):
                break
            prior.query(z, torch.zeros(z.shape[:2], device=device), commit=True)
        return ids, torch.cat(blocks, 1), finished

    def choose(self, candidates: ColaCaptionPipelineOutput, image_tokens: torch.Tensor, score_timesteps: int,
               generator, output_type: str) -> ColaCaptionPipelineOutput:
        """The candidate caption ``(B·n)`` with the lowest denoising error on its image, per image ``(B)``."""
        bsz = image_tokens.shape[0]
        num = len(candidates.texts) // bsz
        texts = [candidates.texts[i * num:(i + 1) * num] for i in range(bsz)]
        errors = self.caption_errors(image_tokens, texts, score_timesteps, generator)  # (B, n)
        scores, best = errors.min(1)
        rows = torch.arange(bsz, device=best.device) * num + best  # (B,)
        keep = rows.tolist()
        return ColaCaptionPipelineOutput(
            texts=[candidates.texts[i] for i in keep] if output_type == "text" else None,
            sequences=[candidates.sequences[i] for i in keep] if output_type != "latent" else None,
            latents=candidates.latents[rows], finished=candidates.finished[rows], scores=scores)

    @torch.no_grad()
    def score_captions(self, image, captions: list[str] | list[list[str]], score_timesteps: int = 8,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        r"""How well each caption explains its image: ``(B, n)`` text → image denoising errors (lower is better).

        The adapter's text → image direction as a diffusion classifier: the flow-matching error of
        the image's latents with each caption as history, at ``score_timesteps`` fixed timesteps and
        noise shared by all captions of an image (so differences come from the captions alone).

        Args:
            image: as in :meth:`__call__`, ``B`` images.
            captions: ``n`` captions per image: a list of ``B`` equally long lists of str, or (one image) a
                list of str or a str.
        """
        image_tokens = self.encode_image(self.preprocess(image))
        if isinstance(captions, str) or (captions and all(isinstance(c, str) for c in captions)):
            captions = [[captions] if isinstance(captions, str) else captions]
        rows = captions if isinstance(captions, (list, tuple)) else []
        sizes = {len(c) if isinstance(c, (list, tuple)) and all(isinstance(t, str) for t in c) else 0 for c in rows}
        if len(rows) != image_tokens.shape[0] or len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"`captions` must hold one non-empty list of str per image, all of the same length "
                             f"({image_tokens.shape[0]} image(s)); got {captions!r:.200}.")
        ok, message = _score_timesteps_check(score_timesteps)
        if not ok:
            raise ValueError(message)
        return self.caption_errors(image_tokens, [list(c) for c in captions], score_timesteps, generator)

    def caption_errors(self, image_tokens: torch.Tensor, texts: list[list[str]], score_timesteps: int,
                       generator) -> torch.Tensor:
        """``(B, n)`` denoising errors of ``texts[b]`` on image tokens ``(B, N, d)``; a caption repeated for
        the same image is scored once."""
        bsz, device = image_tokens.shape[0], image_tokens.device
        noise = randn_tensor((bsz, score_timesteps) + tuple(image_tokens.shape[1:]), generator=generator,
                             device=device, dtype=torch.float32)
        timesteps = (torch.arange(score_timesteps, dtype=torch.float64) + 0.5) / score_timesteps
        pairs = list(dict.fromkeys((b, t) for b, row in enumerate(texts) for t in row))
        errors = {}
        for start in range(0, len(pairs), SCORE_CHUNK):
            chunk = pairs[start:start + SCORE_CHUNK]
            rows = torch.tensor([b for b, _ in chunk], device=device)
            latents, valid = encode_captions(self.vae, self.tokenizer, [t for _, t in chunk], self.block_size,
                                             self.tokenizer.pad_token_id)
            out = text_to_image_errors(self.prior, latents, valid, image_tokens[rows], timesteps, noise[rows],
                                       self.modality)
            errors.update(zip(chunk, out.tolist()))
        return torch.tensor([[errors[(b, t)] for t in row] for b, row in enumerate(texts)], device=device)

    def postprocess(self, ids, latents, finished, stop, output_type) -> ColaCaptionPipelineOutput:
        if output_type == "latent":
            return ColaCaptionPipelineOutput(None, None, latents, finished)
        stops = set(stop.tolist())
        sequences = []
        for row in ids.tolist():
            end = next((i for i, t in enumerate(row) if t in stops), len(row))
            sequences.append(row[:end])
        texts = None
        if output_type == "text":
            texts = [t.strip() for t in self.tokenizer.batch_decode(sequences, skip_special_tokens=True)]
        return ColaCaptionPipelineOutput(texts, sequences, latents, finished)


def _is_count(x, high: int) -> bool:
    return _is_int(x) and 1 <= x <= high


def _score_timesteps_check(score_timesteps) -> tuple[bool, str]:
    return _is_count(score_timesteps, 1000), f"`score_timesteps` must be an int in [1, 1000], got {score_timesteps!r}."


def load_image_pipeline(cls, model: str | os.PathLike, adapter: str | os.PathLike | None = None,
                        autoencoder: str | os.PathLike | None = None):
    """``cls.from_pretrained(model)`` for a full image pipeline folder, or ``cls.from_parts`` when an
    adapter (and autoencoder) folder is given with a text pipeline folder."""
    if adapter is None and autoencoder is None:
        if not (Path(model) / "model_index.json").is_file():
            raise FileNotFoundError(f"{model}: not a diffusers pipeline folder (no model_index.json).")
        return cls.from_pretrained(model)
    if adapter is None or autoencoder is None:
        raise ValueError("pass both an image adapter folder and an autoencoder folder (or neither, with a full "
                         "image pipeline folder as the model).")
    return cls.from_parts(model, adapter, autoencoder)


__all__ = ["ColaCaptionPipeline", "ColaCaptionPipelineOutput", "ColaImagePipelineOutput", "ColaImagePriorPipeline",
           "PriorSamplingMixin", "encode_captions", "load_image_pipeline"]
