"""The shared block-causal flow-matching engine.

A *block* is a run of latent tokens ``(B, L, C)``; nothing here knows whether they are text, image
patches or video frames. The engine has five pieces:

* :class:`CachedStream` — one model's committed history in an explicit :class:`~colabridge.KVCache`
  (the prior's, or a decoder's), with per-sample positions so samples with different history lengths
  share one batch.
* :func:`guided_velocity` — classifier-free guidance where *cond* sees the history and *uncond* sees
  the block alone (positions ``0…L-1``), the official Cola convention (spec §5.4 step 3).
* :func:`transport_block` — integrates the block from σ=1 (noise) to σ=0 with a diffusers flow-match
  scheduler, keeping *pinned* tokens at given values with timestep 0 (the official "repaint" of a
  partial prompt block).
* :func:`projected_velocity` — optional projection of the clean estimate onto the data (Diffusion-LM
  clamping), e.g. text latents snapped to the re-encoding of their decoded tokens.
* :func:`transport_in_passes` — a block transported several times, fixing a few more tokens (projected
  onto the data) after each pass: sequential generation inside a block with the same model.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..models.cache import KVCache
from .schedules import NUM_TRAIN_TIMESTEPS


def round_to(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Round ``x`` through ``dtype`` and back (the official bf16 rounding of DiT inputs); no-op if None."""
    return x if dtype is None or x.dtype == dtype else x.to(dtype).to(x.dtype)


class CachedStream:
    """History of one cached model for a batch: KV cache + per-sample committed length.

    ``model`` must accept ``(x, *args, position_ids=, valid=, kv_cache=, commit=)``; both
    :class:`~colabridge.ColaDiT` and :meth:`ColaTextVAE.decode` do. Inputs are cast to ``dtype``
    (the model's parameter dtype).
    """

    def __init__(self, model: Callable, cache: KVCache, batch_size: int, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        self.model, self.cache, self.dtype = model, cache, dtype
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    def positions(self, length: int) -> torch.Tensor:
        """Positions ``(B, length)`` of the next ``length`` tokens of every sample."""
        return self.lengths[:, None] + torch.arange(length, device=self.lengths.device)

    def prefill(self, x: torch.Tensor, valid: torch.Tensor, *args, **kwargs):
        """Commit a left-padded history ``x`` ``(B, P, C)``; ``valid`` ``(B, P)`` marks real tokens."""
        pos = (valid.long().cumsum(1) - 1).clamp(min=0) + self.lengths[:, None]
        out = self.model(x.to(self.dtype), *args, position_ids=pos, valid=valid, kv_cache=self.cache, commit=True, **kwargs)
        self.lengths = self.lengths + valid.sum(1)
        return out

    def select(self, index: torch.Tensor) -> None:
        """Keep only the samples ``index`` (e.g. drop finished ones)."""
        self.cache, self.lengths = self.cache.select(index), self.lengths[index]

    def query(self, x: torch.Tensor, *args, commit: bool = False, **kwargs):
        """Run the model on a block after the history; ``commit`` appends it to the history."""
        out = self.model(x.to(self.dtype), *args, position_ids=self.positions(x.shape[1]), kv_cache=self.cache, commit=commit, **kwargs)
        if commit:
            self.lengths = self.lengths + x.shape[1]
        return out


def clean_estimate(latents: torch.Tensor, timesteps: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """``ẑ0 = z_t − σ·v`` for the flow ``z_t = (1 − σ)·z0 + σ·z1`` (``timesteps`` ``(B, L)`` on the 0…1000 scale)."""
    return latents - timesteps[..., None] / NUM_TRAIN_TIMESTEPS * velocity


class SelfCondition:
    """Self-conditioning state of one block: the last clean estimate ``ẑ0 = z_t − σ·v`` (zeros before
    the first model call), fed back to a prior trained with it. Pinned tokens (σ = 0) read their values."""

    def __init__(self, enabled: bool, input_rounding: torch.dtype | None = None):
        self.enabled, self.rounding, self.z0 = enabled, input_rounding, None

    def kwargs(self, latents: torch.Tensor, dtype: torch.dtype, copies: int = 1) -> dict:
        """Extra prior arguments for ``latents`` ``(B, L, C)`` repeated ``copies`` times along L."""
        if not self.enabled:
            return {}
        z0 = torch.zeros_like(latents) if self.z0 is None else self.z0
        return {"self_cond": round_to(z0.repeat(1, copies, 1), self.rounding).to(dtype)}

    def update(self, latents: torch.Tensor, timesteps: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            self.z0 = clean_estimate(latents, timesteps, v)
        return v


def guided_velocity(
    prior: Callable,
    history: CachedStream,
    guidance_scale: torch.Tensor,
    input_rounding: torch.dtype | None = None,
    self_condition: bool = False,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Velocity function ``v(latents (B,L,C), timesteps (B,L))`` with history-vs-alone CFG.

    ``v = s·(cond − uncond) + uncond`` with ``s`` = ``guidance_scale`` ``(B,)``. *uncond* is the same
    block with no history at positions ``0…L−1``. ``input_rounding`` rounds latents and timesteps
    before the prior (bf16 in the official algorithm, spec §5.5). ``self_condition``: both branches
    read the guided clean estimate of the previous call (:class:`SelfCondition`).
    """
    scale = guidance_scale[:, None, None]
    dtype = prior.dtype
    sc = SelfCondition(self_condition, input_rounding)

    def velocity(latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        x, t = round_to(latents, input_rounding).to(dtype), round_to(timesteps, input_rounding)
        kw = sc.kwargs(latents, dtype)
        cond = history.query(x, t, **kw).sample.float()
        uncond = prior(x, t, **kw).sample.float()
        return sc.update(latents, timesteps, scale * (cond - uncond) + uncond)

    return velocity


def projected_velocity(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    project: Callable[[torch.Tensor], torch.Tensor],
    max_sigma: float,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``velocity`` whose clean estimate is replaced by ``project(ẑ0)`` for tokens with 0 < σ ≤ ``max_sigma``.

    The "clamping trick" of Diffusion-LM (Li et al. 2022): ``v' = (z_t − P(ẑ0)) / σ`` is the velocity whose
    clean estimate is ``P(ẑ0)``, so an Euler step lands on the projected data point at σ = 0. ``project``
    maps ``(B, L, C)`` to ``(B, L, C)`` (e.g. decode to tokens and re-encode). Pinned tokens (σ = 0) keep ``v``.
    """

    def fn(latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        v = velocity(latents, timesteps)
        sigma = timesteps / NUM_TRAIN_TIMESTEPS
        use = (sigma > 0) & (sigma <= max_sigma)
        if not bool(use.any()):
            return v
        z0 = project(clean_estimate(latents, timesteps, v))
        return torch.where(use[..., None], (latents - z0) / sigma.clamp(min=1e-12)[..., None], v)

    return fn


def packed_cfg_mask(history: CachedStream, block_len: int) -> torch.Tensor:
    """Mask ``(B, 1, 2L, H + 2L)`` for [cond block | uncond block] queries over [history | cond | uncond].

    cond queries see the valid history and the cond block; uncond queries see only the uncond block.
    """
    cache, bsz = history.cache, history.lengths.shape[0]
    device = history.lengths.device
    hist = cache.valid[:, : cache.length] if cache.length else torch.zeros(bsz, 0, dtype=torch.bool, device=device)
    ones = torch.ones(bsz, block_len, dtype=torch.bool, device=device)
    cond = torch.cat((hist, ones, ~ones), 1)  # (B, H + 2L)
    uncond = torch.cat((torch.zeros_like(hist), ~ones, ones), 1)
    rows = torch.cat((cond[:, None].expand(-1, block_len, -1), uncond[:, None].expand(-1, block_len, -1)), 1)
    return rows[:, None]  # (B, 1, 2L, H + 2L)


def packed_guided_velocity(
    prior: Callable,
    history: CachedStream,
    guidance_scale: torch.Tensor,
    block_len: int,
    input_rounding: torch.dtype | None = None,
    self_condition: bool = False,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """:func:`guided_velocity` in ONE prior forward per step.

    Each sample carries its block twice, side by side: a *cond* copy at its history positions and an
    *uncond* copy at positions ``0…L−1`` that sees only itself. Twice the rows per matmul, half the
    calls; positions and mask are built once per block and reused by every step.
    """
    bsz, device = history.lengths.shape[0], history.lengths.device
    positions = torch.cat((history.positions(block_len), torch.arange(block_len, device=device).expand(bsz, -1)), 1)
    mask = packed_cfg_mask(history, block_len)
    rope = prior.rotary_tables(positions)
    scale = guidance_scale[:, None, None]
    dtype = history.dtype
    sc = SelfCondition(self_condition, input_rounding)

    def velocity(latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        x = round_to(torch.cat((latents, latents), 1), input_rounding).to(dtype)
        t = round_to(torch.cat((timesteps, timesteps), 1), input_rounding)
        out = prior(x, t, position_ids=positions, kv_cache=history.cache, attention_mask=mask, rotary_tables=rope,
                    **sc.kwargs(latents, dtype, copies=2)).sample.float()
        cond, uncond = out.split(block_len, dim=1)
        return sc.update(latents, timesteps, scale * (cond - uncond) + uncond)

    return velocity


def pin(latents: torch.Tensor, pinned: torch.Tensor | None, values: torch.Tensor | None) -> torch.Tensor:
    """Overwrite pinned tokens ``(B, L)`` with ``values`` ``(B, L, C)``."""
    return latents if pinned is None else torch.where(pinned[..., None], values, latents)


def transport_block(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    scheduler,
    schedule: dict,
    pinned: torch.Tensor | None = None,
    pinned_values: torch.Tensor | None = None,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Integrate one block of ``latents`` ``(B, L, C)`` from noise (σ=1) to data (σ=0).

    ``scheduler`` is a diffusers flow-match scheduler, reset with ``set_timesteps(**schedule)`` (e.g.
    explicit ``sigmas`` so the official grid is exact); one model call per scheduler timestep. Pinned tokens sit at their values with timestep 0 during every model call and are
    re-pinned after every step (per-token timesteps). ``on_step(i, t, latents)`` may return new latents.
    """
    scheduler.set_timesteps(**schedule, device=latents.device)
    for i, t in enumerate(scheduler.timesteps):
        latents = pin(latents, pinned, pinned_values)
        timesteps = torch.full(latents.shape[:2], float(t), device=latents.device)
        if pinned is not None:
            timesteps = timesteps.masked_fill(pinned, 0.0)
        v = velocity(latents, timesteps)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
        latents = pin(latents, pinned, pinned_values)
        if on_step is not None:
            latents = on_step(i, t, latents)
    return latents


def num_passes(pinned: torch.Tensor | None, length: int, tokens_per_pass: int) -> int:
    """Passes :func:`transport_in_passes` makes over a block of ``length`` tokens with ``pinned`` ``(B, L)``."""
    free = length if pinned is None else int((~pinned).sum(1).max())
    return max(1, -(-free // tokens_per_pass))


def transport_in_passes(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    scheduler,
    schedule: dict,
    project: Callable[[torch.Tensor], torch.Tensor] | None,
    tokens_per_pass: int,
    pinned: torch.Tensor | None = None,
    pinned_values: torch.Tensor | None = None,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Transport a block in passes that fix ``tokens_per_pass`` more tokens each (sequential sub-blocks).

    Every pass integrates the whole block from the same noise ``latents`` ``(B, L, C)`` with
    :func:`transport_block`. Then the first ``tokens_per_pass`` tokens of each sample that are not
    pinned yet are pinned at ``project(result)`` (e.g. the VAE latents of their decoded tokens), so the
    next pass generates the rest of the block conditioned on them, as on a partial prompt block. A
    sample's last ``tokens_per_pass`` free tokens are never pinned: they come from the final pass, which
    for a sample that needed fewer passes repeats its own last one, so samples are batch-independent.
    ``on_step`` receives the model-call index counted across passes. With ``tokens_per_pass >= L`` this is
    one :func:`transport_block` (``project`` may then be None).
    """
    bsz, length = latents.shape[:2]
    pinned = torch.zeros(bsz, length, dtype=torch.bool, device=latents.device) if pinned is None else pinned.bool()
    values = torch.zeros_like(latents) if pinned_values is None else pinned_values
    calls = 0

    def counted(i, t, z):
        return z if on_step is None else on_step(calls + i, t, z)

    for _ in range(num_passes(pinned, length, tokens_per_pass) - 1):
        z = transport_block(velocity, latents, scheduler, schedule, pinned, values, counted)
        calls += len(scheduler.timesteps)
        free = ~pinned
        more = free.sum(1, keepdim=True) > tokens_per_pass  # samples whose last pass is still to come
        group = free & (free.long().cumsum(1) <= tokens_per_pass) & more  # (B, L) the next tokens to fix
        values = torch.where(group[..., None], project(z).to(values.dtype), values)
        pinned = pinned | group
    return transport_block(velocity, latents, scheduler, schedule, pinned, values, counted)


__all__ = ["CachedStream", "NUM_TRAIN_TIMESTEPS", "SelfCondition", "clean_estimate", "guided_velocity", "num_passes",
           "packed_cfg_mask", "packed_guided_velocity", "pin", "projected_velocity", "round_to", "transport_block",
           "transport_in_passes"]
