r"""Flow-matching objectives of the image bridge: one adapter learns both directions.

* text → image: the sequence ``[caption blocks | image block]``; the caption is clean history
  (timestep 0), the image block is ``z_t = (1−t)·z0 + t·z1`` at ``t·1000``; the loss is the MSE of
  the predicted velocity against ``z1 − z0`` on the image tokens.
* image → text: ``[image block | caption clean | caption noisy]``: the caption is learned block by
  block with the 2L trick of :func:`~colabridge.training.losses.two_l_mask`, every caption block
  also seeing the whole clean image.

Conventions follow :func:`colabridge.training.losses.flow_matching_loss` (spec §6.1): one ``t`` per
sample from :class:`FlowMatchingConfig`'s density, noise ``z1 ~ N(0, I)``. With
``drop_condition_prob`` the condition (caption, resp. image) is hidden from some samples, which
trains the unconditional branch of classifier-free guidance (the block alone; RoPE is relative, so
hidden history at earlier positions equals no history).
"""

from __future__ import annotations

import torch

from ..training.losses import NUM_TRAIN_TIMESTEPS, FlowMatchingConfig, masked_mean, sample_timesteps, two_l_mask
from .multimodal import TEXT, MultimodalPrior, pad_tokens


def _noised(z0: torch.Tensor, cfg: FlowMatchingConfig, generator):
    """``(t (B,), z_t, target z1 − z0)`` for clean latents ``z0`` ``(B, L, C)``."""
    t = sample_timesteps(z0.shape[0], cfg, z0.device, generator)
    z1 = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    zt = (1 - t[:, None, None]) * z0 + t[:, None, None] * z1
    return t, zt, z1 - z0


def _dropped(bsz: int, prob: float, device, generator) -> torch.Tensor:
    """``(B,)`` True where the condition is hidden."""
    if prob <= 0:
        return torch.zeros(bsz, dtype=torch.bool, device=device)
    return torch.rand(bsz, generator=generator, device=device) < prob


def _check_caption(prior: MultimodalPrior, text: torch.Tensor, image: torch.Tensor, modality: str) -> None:
    bs = prior.transformer.config.block_size
    if text.shape[1] % bs:
        raise ValueError(f"caption latents have {text.shape[1]} tokens; pad captions to a multiple of the DiT "
                         f"block_size={bs} so the image block starts at a block boundary.")
    need = (prior.adapters[modality].num_tokens, prior.in_width(modality))
    if tuple(image.shape[1:]) != need:
        raise ValueError(f"image tokens of shape {tuple(image.shape[1:])} do not fit the {modality!r} adapter, "
                         f"which expects {need} (was it trained for another latent space?).")


def text_to_image_velocity(prior: MultimodalPrior, text: torch.Tensor, zt: torch.Tensor, timestep: torch.Tensor,
                           text_valid: torch.Tensor, modality: str = "image") -> torch.Tensor:
    """Velocity ``(B, N, d)`` of the noisy image ``zt`` after the clean caption ``text`` ``(B, T, C_txt)``.

    One forward over ``[caption | image]`` at positions ``0…T+N−1``, caption at timestep 0 (equal to
    prefilling the caption into a KV cache and querying the image block; tested). ``timestep``
    ``(B,)`` on the 0…1000 scale; ``text_valid`` ``(B, T)`` hides caption tokens.
    """
    bsz, n_txt, n_img, device = text.shape[0], text.shape[1], zt.shape[1], text.device
    width = prior.width
    sample = torch.cat((pad_tokens(text, width), pad_tokens(zt, width)), 1)  # (B, T+N, W)
    ids = torch.cat((torch.full((bsz, n_txt), prior.modality_id(TEXT), device=device),
                     torch.full((bsz, n_img), prior.modality_id(modality), device=device)), 1)  # (B, T+N)
    steps = torch.cat((torch.zeros(bsz, n_txt, device=device), timestep[:, None].expand(bsz, n_img)), 1)
    valid = torch.cat((text_valid, torch.ones(bsz, n_img, dtype=torch.bool, device=device)), 1)
    pos = torch.arange(n_txt + n_img, device=device).expand(bsz, -1)
    out = prior(sample, steps, position_ids=pos, valid=valid, modality=ids).sample
    return out[:, n_txt:, : zt.shape[-1]]  # (B, N, d)


def text_to_image_errors(prior: MultimodalPrior, text: torch.Tensor, text_valid: torch.Tensor, image: torch.Tensor,
                         timesteps: torch.Tensor, noise: torch.Tensor, modality: str = "image") -> torch.Tensor:
    """Denoising error ``(B,)`` of the clean image ``image`` ``(B, N, d)`` after the caption ``text`` ``(B, T, C_txt)``.

    The text → image flow-matching loss at fixed points: for each ``timesteps[k]`` in (0, 1) and
    ``noise[:, k]`` ``(B, K, N, d)``, the MSE of the predicted velocity against ``noise − image``,
    averaged over the ``K`` points. With the same points for every caption of an image, a lower error
    means the caption explains the image better (a diffusion classifier's score).
    """
    errors = torch.zeros(image.shape[0], device=image.device)
    for k, t in enumerate(timesteps.tolist()):
        eps = noise[:, k]
        zt = (1 - t) * image + t * eps
        step = torch.full((image.shape[0],), t * NUM_TRAIN_TIMESTEPS, device=image.device)
        v = text_to_image_velocity(prior, text, zt.to(prior.dtype), step, text_valid, modality)
        errors += (v.float() - (eps - image).float()).pow(2).mean((1, 2))
    return errors / len(timesteps)


def image_to_text_velocity(prior: MultimodalPrior, image: torch.Tensor, text: torch.Tensor, zt: torch.Tensor,
                           timestep: torch.Tensor, text_valid: torch.Tensor, sees_image: torch.Tensor | None = None,
                           modality: str = "image") -> torch.Tensor:
    """Velocity ``(B, T, C_txt)`` of the noisy caption ``zt`` given the clean image and clean caption.

    One forward over ``[image (N) | caption clean (T) | caption noisy (T)]`` under
    :func:`image_then_text_mask`: every noisy caption block sees the image, the clean caption blocks
    before it and itself (equal to a KV cache of ``[image | earlier caption blocks]``; tested).
    ``timestep`` ``(B,)`` on the 0…1000 scale; ``sees_image`` ``(B,)`` False hides the image.
    """
    bsz, n_txt, n_img, device = text.shape[0], text.shape[1], image.shape[1], text.device
    width = prior.width
    sample = torch.cat((pad_tokens(image, width), pad_tokens(text, width), pad_tokens(zt, width)), 1)  # (B, N+2T, W)
    ids = torch.cat((torch.full((bsz, n_img), prior.modality_id(modality), device=device),
                     torch.full((bsz, 2 * n_txt), prior.modality_id(TEXT), device=device)), 1)
    steps = torch.cat((torch.zeros(bsz, n_img + n_txt, device=device), timestep[:, None].expand(bsz, n_txt)), 1)
    text_pos = torch.arange(n_txt, device=device).expand(bsz, -1)  # (B, T) within the caption
    pos = torch.cat((torch.arange(n_img, device=device).expand(bsz, -1), n_img + text_pos, n_img + text_pos), 1)
    if sees_image is None:
        sees_image = torch.ones(bsz, dtype=torch.bool, device=device)
    mask = image_then_text_mask(text_pos, text_valid, n_img, prior.transformer.config.block_size, sees_image)
    valid = torch.cat((torch.ones(bsz, n_img, dtype=torch.bool, device=device), text_valid, text_valid), 1)
    out = prior(sample, steps, position_ids=pos, valid=valid, attention_mask=mask, modality=ids).sample
    return out[:, n_img + n_txt:, : text.shape[-1]]  # (B, T, C_txt)


def text_to_image_loss(prior, text, image, text_valid, modality, cfg, drop_condition_prob, generator=None):
    """FM loss on the image block of ``[caption | image]``; returns ``(loss, t)``."""
    t, zt, target = _noised(image, cfg, generator)
    hidden = _dropped(text.shape[0], drop_condition_prob, text.device, generator)
    out = text_to_image_velocity(prior, text, zt, t * NUM_TRAIN_TIMESTEPS, text_valid & ~hidden[:, None], modality)
    return (out.float() - target.float()).pow(2).mean(), t


def image_to_text_loss(prior, text, image, text_valid, modality, cfg, drop_condition_prob, generator=None):
    """FM loss on the noisy caption of ``[image | caption clean | caption noisy]``; returns ``(loss, t)``."""
    t, zt, target = _noised(text, cfg, generator)
    sees_image = ~_dropped(text.shape[0], drop_condition_prob, text.device, generator)
    out = image_to_text_velocity(prior, image, text, zt, t * NUM_TRAIN_TIMESTEPS, text_valid, sees_image, modality)
    mse = (out.float() - target.float()).pow(2).mean(-1)  # (B, T)
    return masked_mean(mse, text_valid), t


def image_then_text_mask(text_pos, text_valid, n_img: int, block_size: int, sees_image: torch.Tensor) -> torch.Tensor:
    """Mask ``(B, 1, N+2T, N+2T)``: the image is one block; the caption follows the 2L layout after it.

    Image queries see the image only; caption queries (clean and noisy) see the image where
    ``sees_image`` ``(B,)`` and otherwise :func:`two_l_mask` among themselves.
    """
    bsz, n_txt = text_pos.shape
    device = text_pos.device
    caption = two_l_mask(text_pos, block_size, text_valid)[:, 0]  # (B, 2T, 2T)
    image_rows = torch.cat((torch.ones(bsz, n_img, n_img, dtype=torch.bool, device=device),
                            torch.zeros(bsz, n_img, 2 * n_txt, dtype=torch.bool, device=device)), 2)
    image_cols = sees_image[:, None, None].expand(bsz, 2 * n_txt, n_img)
    caption_rows = torch.cat((image_cols, caption), 2)  # (B, 2T, N+2T)
    return torch.cat((image_rows, caption_rows), 1)[:, None]  # (B, 1, N+2T, N+2T)


DIRECTIONS = {"text_to_image": text_to_image_loss, "image_to_text": image_to_text_loss}


def flow_matching_loss_image(
    prior: MultimodalPrior,
    text_latents: torch.Tensor,
    image_tokens: torch.Tensor,
    direction: str = "text_to_image",
    text_valid: torch.Tensor | None = None,
    modality: str = "image",
    cfg: FlowMatchingConfig | None = None,
    drop_condition_prob: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    r"""Flow-matching loss of one bridge direction; returns ``(loss, logs)``.

    Args:
        text_latents: normalised caption latents ``(B, T, C_txt)``, ``T`` a multiple of the DiT block size
            (captions padded with the pad token, as prompts are).
        image_tokens: normalised image tokens ``(B, N, c·p·p)`` (``ImageLatentSpace.encode``).
        direction: a key of :data:`DIRECTIONS` (``"text_to_image"`` or ``"image_to_text"``).
        text_valid: ``(B, T)`` False for caption padding hidden from attention (default all valid).
        drop_condition_prob: probability of hiding the condition (trains the CFG uncond branch).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {sorted(DIRECTIONS)}, got {direction!r}.")
    if not 0.0 <= drop_condition_prob <= 1.0:
        raise ValueError(f"drop_condition_prob must be in [0, 1], got {drop_condition_prob}.")
    _check_caption(prior, text_latents, image_tokens, modality)
    if text_valid is None:
        text_valid = torch.ones(text_latents.shape[:2], dtype=torch.bool, device=text_latents.device)
    loss, t = DIRECTIONS[direction](prior, text_latents, image_tokens, text_valid.bool(), modality,
                                    cfg or FlowMatchingConfig(), drop_condition_prob, generator)
    return loss, {f"fm_{direction}": loss.detach(), "t_mean": t.mean().detach()}
