"""Text → CLIP image embedding through the shared block engine: ``ColaClipPriorPipeline`` (a Kandinsky-style prior).

The Cola DiT trunk runs as a :class:`~colabridge.adapters.MultimodalPrior` whose adapter reads and writes the
image-embedding space of an open_clip model (:class:`~colabridge.adapters.ClipEmbeddingSpace`, kind
``"open_clip"``): the prompt's text latents are prefilled into the prior's history and ONE embedding block
(``k`` tokens of ``D/k``) is transported with history-vs-alone CFG (spec §5.4 step 3) — the sampler of
:mod:`colabridge.pipelines.pipeline_image`, not a second one. Outputs follow diffusers'
``KandinskyPriorPipeline``: ``image_embeds`` and ``negative_image_embeds``, and :meth:`interpolate` mixes
text conditions (through the prior) and image conditions (through the CLIP image tower) by weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from transformers import PreTrainedTokenizerBase

from ..adapters import ImageAdapter, fuse_image_adapter, load_image_adapter
from ..adapters.clip_space import CLIP_MODALITY
from ..models import ColaDiT, ColaTextVAE
from ..models.clip import ColaClipEmbedder, load_clip
from .pipeline_cola import ColaPipeline, check_components
from .pipeline_image import PriorSamplingMixin

IMAGE_EMBEDS = CLIP_MODALITY  # the adapter's modality name inside the MultimodalPrior
EMBED_OUTPUT_TYPES = ("pt", "np")


@dataclass
class ColaClipPriorPipelineOutput(BaseOutput):
    """Output of :class:`ColaClipPriorPipeline` (the fields of diffusers' ``KandinskyPriorPipelineOutput``).

    Attributes:
        image_embeds: ``(B·num_images_per_prompt, D)`` unit-norm CLIP image embeddings for the prompts.
        negative_image_embeds: ``(B·num_images_per_prompt, D)`` embeddings for the negative prompt (sampled by
            the prior), or the image tower's embedding of an all-zero image when ``negative_prompt=None``.
    """

    image_embeds: torch.Tensor | np.ndarray
    negative_image_embeds: torch.Tensor | np.ndarray


def check_clip_components(transformer: ColaDiT, prior_adapter: ImageAdapter, image_encoder: ColaClipEmbedder) -> None:
    """The adapter must project to the DiT's width and read the CLIP's embedding space (errors name both)."""
    if prior_adapter.space.kind != "open_clip":
        raise ValueError(f"prior_adapter reads a {prior_adapter.space.kind!r} latent space; ColaClipPriorPipeline needs "
                         "an 'open_clip' adapter (ClipEmbeddingSpace).")
    if prior_adapter.config.txt_dim != transformer.config.txt_dim:
        raise ValueError(f"prior_adapter projects to txt_dim={prior_adapter.config.txt_dim} but the transformer has "
                         f"txt_dim={transformer.config.txt_dim}; use an adapter trained for this transformer.")
    prior_adapter.space.check_encoder(image_encoder)


class ColaClipPriorPipeline(PriorSamplingMixin, DiffusionPipeline):
    r"""Prompt → CLIP image embedding: a text-conditioned prior over an open_clip image-embedding space.

    Components: ``vae`` (:class:`ColaTextVAE`, encodes the prompt), ``transformer`` (:class:`ColaDiT` carrying
    the adapter's LoRA, fused or injected), ``prior_adapter`` (:class:`ImageAdapter` over a
    :class:`~colabridge.adapters.ClipEmbeddingSpace`), ``image_encoder`` (:class:`ColaClipEmbedder`, the CLIP
    whose image tower defines the space), ``scheduler``, ``tokenizer``.
    """

    model_cpu_offload_seq = "vae->transformer->image_encoder"
    adapter_component = "prior_adapter"
    modality = IMAGE_EMBEDS

    def __init__(self, vae: ColaTextVAE, transformer: ColaDiT, prior_adapter: ImageAdapter,
                 image_encoder: ColaClipEmbedder, scheduler: FlowMatchEulerDiscreteScheduler,
                 tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        check_components(vae, transformer)
        check_clip_components(transformer, prior_adapter, image_encoder)
        self.register_modules(vae=vae, transformer=transformer, prior_adapter=prior_adapter,
                              image_encoder=image_encoder, scheduler=scheduler, tokenizer=tokenizer)

    @classmethod
    def from_parts(cls, text_model: str | os.PathLike, adapter: str | os.PathLike, clip: str | os.PathLike,
                   fuse: bool = True, **kwargs):
        """Build from a text pipeline folder (:class:`ColaPipeline`), a CLIP-prior adapter folder and a CLIP folder
        (:func:`~colabridge.models.clip.load_clip`). ``fuse`` merges the LoRA into the DiT."""
        text = ColaPipeline.from_pretrained(text_model, **kwargs)
        image_encoder, _ = load_clip(clip)
        prior_adapter = load_image_adapter(text.transformer, adapter, adapter_name=IMAGE_EMBEDS)
        check_clip_components(text.transformer, prior_adapter, image_encoder)
        if fuse:
            fuse_image_adapter(text.transformer)
        return cls(vae=text.vae, transformer=text.transformer, prior_adapter=prior_adapter.eval(),
                   image_encoder=image_encoder.requires_grad_(False), scheduler=text.scheduler, tokenizer=text.tokenizer)

    # ------------------------------------------------------------------ steps
    def check_inputs(self, prompts, negative_prompts, num_images_per_prompt, num_inference_steps, guidance_scale,
                     output_type, pad_token_id, latents) -> None:
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("`prompt` must be a str or a non-empty list of str.")
        if negative_prompts is not None and (len(negative_prompts) != len(prompts)
                                             or not all(isinstance(p, str) for p in negative_prompts)):
            raise ValueError(f"`negative_prompt` must be None, a str or a list of {len(prompts)} str (one per prompt).")
        self.check_sampling(num_inference_steps, guidance_scale, output_type, EMBED_OUTPUT_TYPES)
        self.check_prompt_batch(len(prompts), num_images_per_prompt, pad_token_id, latents)

    def zero_image_embeds(self, batch_size: int) -> torch.Tensor:
        """The image tower's unit-norm embedding of an all-zero (preprocessed) image, ``(B, D)`` (Kandinsky's
        ``get_zero_embed``)."""
        size = self.image_encoder.image_size
        pixels = torch.zeros(1, 3, size, size, device=self._execution_device, dtype=self.image_encoder.dtype)
        return self.image_encoder.encode_image(pixels).float().repeat(batch_size, 1)  # (B, D)

    def sample_embeds(self, prompts, num_images_per_prompt, num_inference_steps, guidance_scale, generator, latents,
                      pad_token_id, solver, packed_cfg) -> torch.Tensor:
        """Prompts → unit-norm embeddings ``(len(prompts)·n, D)``: encode, prefill, transport one block, decode."""
        prompt_latents, valid = self.encode_prompt(prompts, num_images_per_prompt, pad_token_id)
        history = self.prompt_history(IMAGE_EMBEDS, prompt_latents, valid)
        noise = self.prepare_latents(prompt_latents.shape[0], generator, latents)
        tokens = self.transport(history, noise, guidance_scale, solver, num_inference_steps, packed_cfg)
        return self.space.decode(self.image_encoder, tokens)  # (B·n, D)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = "",
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 16,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
        pad_token_id: int | None = None,
        solver: str = "euler",
        packed_cfg: bool = True,
    ):
        r"""Sample CLIP image embeddings for ``prompt``; returns :class:`ColaClipPriorPipelineOutput`.

        Args:
            prompt: a prompt or a list; ``""`` samples unconditionally.
            negative_prompt: sampled in the same batch as the prompts (as Kandinsky's prior does when a negative
                prompt is given) and returned as ``negative_image_embeds``; a str applies to every prompt.
                ``None``: the image tower's embedding of an all-zero image instead (Kandinsky's default).
            num_images_per_prompt: embeddings per prompt (independent noise).
            num_inference_steps: solver steps for the embedding block.
            guidance_scale: CFG ``v = s·(cond − uncond) + uncond``; cond sees the prompt, uncond the block alone;
                1 disables guidance.
            generator: ``torch.Generator`` (or one per sample) driving the noise.
            latents: initial noise ``(B·n, k, D/k)`` of the prompts (the negatives draw their own).
            output_type: ``"pt"`` or ``"np"``.
            pad_token_id: pads prompts to whole blocks (default: the tokenizer's pad token).
            solver: ``"euler"`` or ``"heun"``; packed_cfg: cond and uncond in one DiT forward.
        """
        # 0. inputs
        pad_token_id = self.tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        negatives = None if negatives is None else list(negatives)
        self.check_inputs(prompts, negatives, num_images_per_prompt, num_inference_steps, guidance_scale, output_type,
                          pad_token_id, latents)
        batch = len(prompts) * num_images_per_prompt
        # 1.–4. prompts (and negatives, in one batch) → history → transported block → embeddings
        if negatives is not None and latents is not None:
            latents = torch.cat((latents, self.prepare_latents(batch, generator, None)))
        embeds = self.sample_embeds(prompts + (negatives or []), num_images_per_prompt, num_inference_steps,
                                    guidance_scale, generator, latents, pad_token_id, solver, packed_cfg)
        # 5. split off the negatives (or embed the zero image)
        image_embeds, negative_embeds = embeds[:batch], embeds[batch:]
        if negatives is None:
            negative_embeds = self.zero_image_embeds(batch)
        self.maybe_free_model_hooks()
        if output_type == "np":
            image_embeds, negative_embeds = image_embeds.cpu().numpy(), negative_embeds.cpu().numpy()
        if not return_dict:
            return image_embeds, negative_embeds
        return ColaClipPriorPipelineOutput(image_embeds=image_embeds, negative_image_embeds=negative_embeds)

    # ------------------------------------------------------------------ interpolation
    @torch.no_grad()
    def interpolate(
        self,
        images_and_prompts: list[str | PIL.Image.Image | torch.Tensor],
        weights: list[float],
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 16,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        negative_prior_prompt: str | None = None,
        negative_prompt: str = "",
        guidance_scale: float = 3.0,
    ) -> ColaClipPriorPipelineOutput:
        r"""Weighted sum of conditions' image embeddings, as diffusers' ``KandinskyPriorPipeline.interpolate``.

        Each prompt is sampled by the prior (``negative_prior_prompt`` as its negative); each image (PIL RGB,
        ``(H, W, 3)`` uint8 array, or ``(3, S, S)`` / ``(1, 3, S, S)`` tensor in [0, 1]) is embedded by the
        CLIP image tower (unit norm). ``image_embeds = Σ wᵢ·eᵢ`` ``(num_images_per_prompt, D)``, not
        renormalised (as Kandinsky). ``negative_image_embeds``: the prior's sample for ``negative_prompt``
        (its negative output when ``negative_prompt == ""``, i.e. the zero-image embedding unless
        ``negative_prior_prompt`` is set, as Kandinsky).
        """
        if len(images_and_prompts) != len(weights) or not weights:
            raise ValueError(f"`images_and_prompts` has {len(images_and_prompts)} items and `weights` {len(weights)}; "
                             "pass one weight per condition (at least one).")
        sampling = dict(num_images_per_prompt=num_images_per_prompt, num_inference_steps=num_inference_steps,
                        generator=generator, latents=latents, guidance_scale=guidance_scale)
        total = 0
        for cond, weight in zip(images_and_prompts, weights):
            total = total + weight * self.condition_embeds(cond, negative_prior_prompt, sampling)
        zero = self(negative_prompt, negative_prompt=negative_prior_prompt, **sampling)
        negative = zero.negative_image_embeds if negative_prompt == "" else zero.image_embeds
        return ColaClipPriorPipelineOutput(image_embeds=total, negative_image_embeds=negative)

    def condition_embeds(self, cond, negative_prior_prompt, sampling: dict) -> torch.Tensor:
        """One condition of :meth:`interpolate` → embeddings ``(num_images_per_prompt, D)``."""
        if isinstance(cond, str):
            return self(cond, negative_prompt=negative_prior_prompt, **sampling).image_embeds
        if isinstance(cond, (PIL.Image.Image, np.ndarray, torch.Tensor)):
            embeds = self.image_encoder.embed_images(cond).float()  # (1, D)
            if embeds.shape[0] != 1:
                raise ValueError(f"an image condition must be one image, got a batch of {embeds.shape[0]}.")
            return embeds.repeat(sampling["num_images_per_prompt"], 1)
        raise TypeError("`images_and_prompts` items must be str, PIL.Image.Image, numpy arrays or torch.Tensor, "
                        f"got {type(cond).__name__}.")


__all__ = ["ColaClipPriorPipeline", "ColaClipPriorPipelineOutput", "check_clip_components"]
