r"""Training objectives of Cola DLM (spec §6; paper Stage 1 / Stage 2).

Everything here is plain maths on models and tensors, shared by the trainers and the tests:

* Stage 1, Text VAE: ``L_VAE = recon + λ_mask·L_mask + β·KL(q_φ ‖ N(0, I))``
  (:func:`vae_loss`). The decoder reads ``vae.normalize(z)``, the space the pipeline hands it
  (spec §4.2: inference decodes normalised latents); a fresh VAE has scale 1 / shift 0, so Stage 1
  then decodes raw latents, and :func:`store_latent_stats` refits the decoder input to new statistics.
* DiT flow matching with the official convention (spec §6.1): ``z_t = (1−t)·z0 + t·z1``,
  target ``z1 − z0``, timestep ``t·1000``, one ``t`` per sample, fed with the "2L trick"
  ``[clean z0 | noisy z_t]`` under :func:`two_l_mask` (:func:`flow_matching_loss`).
* Stage 2, joint: ``λ_vae·(recon + λ_mask·L_mask + β·KL) + λ_fm·L_FM + λ_ref·KL(q_φ ‖ q_φ_ref)``
  (:func:`joint_loss`); ``freeze_vae=True`` is the official DiT-only recipe. An optional rounding term
  ``λ_round·(−log p_θ(x | ẑ0))`` (Li et al. 2022, Diffusion-LM) decodes the DiT's clean estimates, and an
  optional token term ``λ_tok·CE(head(h_ℓ), x)`` (:class:`TokenHead`) asks a training-only linear head on
  the hidden states of DiT block ℓ to name each noisy token (an auxiliary representation loss).

Every loss returns ``(total, logs)`` where ``logs`` maps names to detached scalars, so each part
can be watched separately (the paper's diagnostic point). Randomness comes from an optional
``torch.Generator`` (default: the global RNG, whose state accelerate checkpoints).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.text_vae import LOGVAR_RANGE, TextLatentPosterior
from ..sampling.engine import clean_estimate
from ..sampling.schedules import NUM_TRAIN_TIMESTEPS  # DiT timesteps live on the 0…1000 scale (spec §4.3)
TIMESTEP_DENSITIES = ("logit_normal", "uniform")


# --------------------------------------------------------------------------- configs


@dataclass
class VAELossConfig:
    """Weights of the Stage-1 objective.

    Attributes:
        recon_weight: weight of the reconstruction cross-entropy ``−log p_θ(x | z)``.
        mask_weight: λ_mask, weight of the BERT-style masking loss (0 skips its forward pass).
        mask_prob: fraction of input tokens replaced by ``vae.mask_token_id`` in the masking pass.
        kl_weight: β, weight of ``KL(q_φ(z|x) ‖ N(0, I))`` (summed over channels, mean over tokens).
        sample_posterior: decode ``mean + std·ε`` (True, the VAE objective) or the mean.
    """

    recon_weight: float = 1.0
    mask_weight: float = 0.5
    mask_prob: float = 0.15
    kl_weight: float = 1e-4
    sample_posterior: bool = True


@dataclass
class FlowMatchingConfig:
    """Flow-matching options (spec §6.1, §6.2).

    Attributes:
        timestep_density: ``"logit_normal"`` (t = sigmoid(loc + scale·N(0,1))) or ``"uniform"``.
        timestep_per: ``"row"`` (official: one t for every noisy block of a row) or ``"block"`` (an
            independent t per block: the blocks are separate conditional problems under the 2L mask, so
            a row then averages the loss over as many noise levels as it has blocks).
        logit_loc, logit_scale: logit-normal parameters (official pretraining loc 1.0, CPT/SFT 0.0).
        block_sizes: per-sample block sizes to draw from (official: {1, 2, 4, …, dit.block_size});
            empty means always ``dit.block_size``.
        block_size_probs: probabilities of ``block_sizes`` (uniform when empty).
        prompt_block_prob: probability that a block's first ``s`` noisy tokens are made clean
            (t = 0, no loss), simulating the pinned partial prompt block of inference.
        self_condition_prob: for a DiT with ``self_condition``, the fraction of rows whose noisy copy
            reads the model's own no-gradient estimate of z0 (the rest read zeros), as in Chen et al. 2022.
        history_drop_prob: fraction of noisy blocks that see no clean history (condition dropout). The
            sampler's CFG *uncond* branch is a block alone; with 0 (official) the only history-free
            blocks in training are row starts, so *uncond* learns the distribution of row starts
            rather than of all blocks.
    """

    timestep_density: str = "logit_normal"
    timestep_per: str = "row"
    logit_loc: float = 0.0
    logit_scale: float = 1.0
    block_sizes: list[int] = field(default_factory=list)
    block_size_probs: list[float] = field(default_factory=list)
    prompt_block_prob: float = 0.05
    self_condition_prob: float = 0.5
    history_drop_prob: float = 0.0

    def __post_init__(self):
        if self.timestep_density not in TIMESTEP_DENSITIES:
            raise ValueError(f"timestep_density={self.timestep_density!r}: use one of {TIMESTEP_DENSITIES}.")
        if self.timestep_per not in ("row", "block"):
            raise ValueError(f"timestep_per={self.timestep_per!r}: use 'row' (official) or 'block'.")
        if self.block_size_probs and len(self.block_size_probs) != len(self.block_sizes):
            raise ValueError(f"block_size_probs has {len(self.block_size_probs)} entries for "
                             f"{len(self.block_sizes)} block_sizes; give one probability per size.")


@dataclass
class JointLossConfig:
    """Stage-2 objective weights (spec §6 prose: ``λ_VAE·L_VAE + λ_fm·L_FM + λ_ref·KL(q_φ‖q_φ_ref)``).

    Attributes:
        vae: the Stage-1 terms, weighted together by ``vae_weight``.
        fm: flow-matching options.
        vae_weight, fm_weight, ref_weight: λ_VAE, λ_fm, λ_ref.
        round_weight: λ_round, weight of Diffusion-LM's rounding term (:func:`rounding_loss`: the decoder's
            cross-entropy of the true tokens given the DiT's clean estimates); 0 (official) skips it.
        token_weight: λ_tok, weight of the token term (:func:`token_loss`: a :class:`TokenHead` on the
            hidden states of DiT block ``token_layer`` names every noisy token); 0 (official) skips it.
        token_layer: index into ``dit.blocks`` whose output the token head reads (``-1``: the last).
        detach_latents: stop the FM gradient at z0 (True: the VAE is trained by its own terms only;
            False: the joint stage proper, FM gradients reach the encoder).
        freeze_vae: the official DiT-only recipe: VAE in no-grad mode, only ``L_FM`` is optimised.
        fm_latents: ``"sample"`` (official default ``--vae-mode sample``) or ``"mean"`` as z0.
    """

    vae: VAELossConfig = field(default_factory=VAELossConfig)
    fm: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    vae_weight: float = 1.0
    fm_weight: float = 1.0
    ref_weight: float = 0.1
    round_weight: float = 0.0
    token_weight: float = 0.0
    token_layer: int = -1
    detach_latents: bool = False
    freeze_vae: bool = False
    fm_latents: str = "sample"

    @classmethod
    def from_dict(cls, d: dict) -> "JointLossConfig":
        d = dict(d)
        vae = VAELossConfig(**d.pop("vae", {}))
        fm = FlowMatchingConfig(**d.pop("fm", {}))
        return cls(vae=vae, fm=fm, **d)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- small pieces


def masked_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``Σ w·v / max(Σ w, 1)`` over all elements (plain mean when ``weights`` is None)."""
    if weights is None:
        return values.mean()
    weights = weights.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean CE of ``logits`` ``(B, L, V)`` against ``targets`` ``(B, L)`` over positions with ``weights``."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)
    return masked_mean(ce, weights)


def token_accuracy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Fraction of weighted positions whose argmax equals the target."""
    return masked_mean((logits.argmax(-1) == targets).float(), weights)


def mask_tokens(
    input_ids: torch.LongTensor, mask_id: int, prob: float, weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """BERT-style corruption: replace a ``prob`` fraction of (weighted) tokens by ``mask_id``.

    Returns ``(masked_ids, masked)`` where ``masked`` ``(B, L)`` is True at replaced positions.
    """
    draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    masked = draw < prob
    if weights is not None:
        masked &= weights.bool()
    return input_ids.masked_fill(masked, mask_id), masked


def gaussian_kl(q: TextLatentPosterior, p: TextLatentPosterior) -> torch.Tensor:
    """``KL(q ‖ p)`` of diagonal Gaussians, summed over channels: ``(B, L)``."""
    lq, lp = q.logvar.clamp(*LOGVAR_RANGE), p.logvar.clamp(*LOGVAR_RANGE)
    return 0.5 * (lp - lq + (lq.exp() + (q.mean - p.mean).pow(2)) / lp.exp() - 1.0).sum(-1)


def sample_timesteps(
    batch_size: int, cfg: FlowMatchingConfig, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One ``t ∈ (0, 1)`` per sample ``(B,)``: logit-normal ``sigmoid(loc + scale·N(0,1))`` or uniform."""
    if cfg.timestep_density == "uniform":
        return torch.rand(batch_size, generator=generator, device=device)
    normal = torch.randn(batch_size, generator=generator, device=device)
    return torch.sigmoid(cfg.logit_loc + cfg.logit_scale * normal)


def sample_block_sizes(batch_size: int, default: int, cfg: FlowMatchingConfig, device=None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample block sizes ``(B,)`` drawn from ``cfg.block_sizes`` (all ``default`` if empty)."""
    if not cfg.block_sizes:
        return torch.full((batch_size,), default, dtype=torch.long, device=device)
    probs = torch.tensor(cfg.block_size_probs or [1.0] * len(cfg.block_sizes), dtype=torch.float)
    choice = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
    return torch.tensor(cfg.block_sizes, dtype=torch.long)[choice].to(device)


def two_l_mask(
    position_ids: torch.LongTensor, block_size: int | torch.Tensor, valid: torch.Tensor | None = None,
    history_drop: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean attention mask ``(B, 1, 2L, 2L)`` of the "clean copy beside noisy copy" trick (spec §6.1).

    Sequence layout ``[clean z0 (L) | noisy z_t (L)]``, both copies at positions ``position_ids``
    ``(B, L)``. With block index ``β(·) = position // block_size``:

    * clean query a → clean key b iff ``β(a) ≥ β(b)`` (block-causal, as the cached history);
    * noisy query a → clean key b iff ``β(a) > β(b)`` (strictly earlier clean history);
    * noisy query a → noisy key b iff ``β(a) = β(b)`` (its own noisy block);
    * clean queries never see noisy keys.

    ``block_size`` is an int or a per-sample ``(B,)`` tensor. Keys with ``valid`` False are hidden;
    padding queries see everything so their (unused) outputs stay finite. Noisy queries with
    ``history_drop`` ``(B, L)`` True see no clean keys (a block alone, as CFG's *uncond*).
    """
    bs = torch.as_tensor(block_size, device=position_ids.device)
    bs = bs[:, None] if bs.ndim == 1 else bs
    blk = position_ids // bs  # (B, L)
    q, k = blk[:, :, None], blk[:, None, :]  # (B, L, 1), (B, 1, L)
    no = torch.zeros_like(q >= k)
    top = torch.cat((q >= k, no), dim=2)  # clean queries: (B, L, 2L)
    history = q > k if history_drop is None else (q > k) & ~history_drop.bool()[:, :, None]
    bottom = torch.cat((history, q == k), dim=2)  # noisy queries: (B, L, 2L)
    allowed = torch.cat((top, bottom), dim=1)  # (B, 2L, 2L)
    if valid is not None:
        v2 = torch.cat((valid, valid), dim=1).bool()  # (B, 2L)
        allowed = (allowed & v2[:, None, :]) | ~v2[:, :, None]
    return allowed[:, None]  # (B, 1, 2L, 2L)


# --------------------------------------------------------------------------- Stage 1


def vae_terms(
    vae, input_ids: torch.LongTensor, loss_mask: torch.Tensor | None, cfg: VAELossConfig,
    attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict, TextLatentPosterior, torch.Tensor]:
    """The VAE terms on one batch; also returns the posterior and the decoded latents ``vae.normalize(z)``.

    The decoder consumes normalised latents, the tensor :class:`ColaPipeline` hands it (prompt
    latents and transported blocks), so training and inference decode the same space.

    ``loss_mask`` ``(B, L)`` selects the positions that count (e.g. not padding); ``attention_mask``
    is the encoder's own padding mask (None: every token, pads included, is visible, as at inference
    where prompts are block-padded with the pad id).
    """
    posterior = vae.encode(input_ids, attention_mask)
    z = vae.normalize(posterior.sample(generator) if cfg.sample_posterior else posterior.mode())  # (B, L, c)
    logits = vae.decode(z)  # (B, L, V)
    recon = token_cross_entropy(logits, input_ids, loss_mask)
    kl = masked_mean(posterior.kl(), loss_mask) if posterior.logvar is not None else recon.new_zeros(())
    total = cfg.recon_weight * recon + cfg.kl_weight * kl
    logs = {"recon": recon.detach(), "kl": kl.detach(), "acc": token_accuracy(logits.detach(), input_ids, loss_mask)}
    if cfg.mask_weight > 0:
        masked_ids, masked = mask_tokens(input_ids, vae.mask_token_id, cfg.mask_prob, loss_mask, generator)
        m_post = vae.encode(masked_ids, attention_mask)
        m_z = vae.normalize(m_post.sample(generator) if cfg.sample_posterior else m_post.mode())
        mask_loss = token_cross_entropy(vae.decode(m_z), input_ids, masked)
        total = total + cfg.mask_weight * mask_loss
        logs["mask"] = mask_loss.detach()
    return total, logs, posterior, z


def vae_loss(vae, input_ids, loss_mask=None, cfg: VAELossConfig | None = None, attention_mask=None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """Stage-1 loss ``recon + λ_mask·L_mask + β·KL(q_φ ‖ N(0, I))``; returns ``(loss, logs)``."""
    total, logs, _, _ = vae_terms(vae, input_ids, loss_mask, cfg or VAELossConfig(), attention_mask, generator)
    logs["loss"] = total.detach()
    return total, logs


# --------------------------------------------------------------------------- flow matching


@dataclass
class FlowMatchingPass:
    """One DiT pass of :func:`flow_matching_pass`: what the FM loss and the rounding loss read.

    ``velocity``, ``target``, ``z0``, ``zt`` ``(B, L, C)``; ``steps`` ``(B, L)`` on the 0…1000 scale;
    ``block`` ``(B,)`` block sizes; ``valid`` and ``weights`` ``(B, L)`` (positions that count).
    """

    velocity: torch.Tensor
    target: torch.Tensor
    z0: torch.Tensor
    zt: torch.Tensor
    steps: torch.Tensor
    block: torch.Tensor
    valid: torch.Tensor
    weights: torch.Tensor

    def mse(self) -> torch.Tensor:
        """``Σ weights·mean_c(v̂ − (z1 − z0))² / max(Σ weights, 1)``."""
        return masked_mean((self.velocity.float() - self.target.float()).pow(2).mean(-1), self.weights)

    def clean_estimate(self) -> torch.Tensor:
        """The DiT's one-step clean estimate ``ẑ0 = z_t − σ·v̂`` ``(B, L, C)``."""
        return clean_estimate(self.zt, self.steps, self.velocity.to(self.zt.dtype))


def flow_matching_pass(
    dit, z0: torch.Tensor, loss_mask: torch.Tensor | None = None, cfg: FlowMatchingConfig | None = None,
    valid: torch.Tensor | None = None, generator: torch.Generator | None = None,
) -> FlowMatchingPass:
    r"""Noise ``z0`` and run the DiT once with the 2L trick (spec §6.1); see :func:`flow_matching_loss`."""
    cfg = cfg or FlowMatchingConfig()
    bsz, length, _ = z0.shape
    device = z0.device
    per_block = cfg.timestep_per == "block"
    t = sample_timesteps(bsz * length if per_block else bsz, cfg, device, generator)  # (B·L,) or (B,)
    z1 = torch.randn(z0.shape, generator=generator, device=device, dtype=z0.dtype)
    block = sample_block_sizes(bsz, dit.config.block_size, cfg, device, generator)  # (B,)
    pos = torch.arange(length, device=device).expand(bsz, length)
    # (B, L) per-token t: the row's t, or the draw of the token's block (index = block number)
    tt = t.view(bsz, length).gather(1, pos // block[:, None]) if per_block else t[:, None].expand(bsz, length).clone()
    pinned = _prompt_pins(pos, block, cfg.prompt_block_prob, generator)  # (B, L)
    dropped = _history_drops(pos, block, cfg.history_drop_prob, generator)  # (B, L) or None
    tt = tt.masked_fill(pinned, 0.0)
    zt = ((1 - tt[..., None]) * z0 + tt[..., None] * z1).to(z0.dtype)  # (B, L, C)
    valid = torch.ones(bsz, length, dtype=torch.bool, device=device) if valid is None else valid.bool()
    steps = tt * NUM_TRAIN_TIMESTEPS
    sc = None
    if getattr(dit.config, "self_condition", False):
        sc = self_condition_estimate(dit, z0, zt, steps, block, valid, cfg.self_condition_prob, generator, dropped)
    out = two_l_velocity(dit, z0, zt, steps, block, valid, self_cond=sc, history_drop=dropped)
    weights = valid & ~pinned if loss_mask is None else loss_mask.bool() & valid & ~pinned
    return FlowMatchingPass(out, z1 - z0, z0, zt, steps, block, valid, weights)


def flow_matching_loss(
    dit, z0: torch.Tensor, loss_mask: torch.Tensor | None = None, cfg: FlowMatchingConfig | None = None,
    valid: torch.Tensor | None = None, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    r"""Block-causal flow-matching loss with the 2L trick (spec §6.1).

    Args:
        z0: normalised clean latents ``(B, L, C)``.
        loss_mask: ``(B, L)`` positions whose velocity error counts (default all).
        valid: ``(B, L)`` False for padding latents, hidden from attention (default all valid).

    The DiT sees ``[z0 | z_t]`` with timesteps ``[0 | t·1000]`` at positions ``[0…L−1 | 0…L−1]``
    under :func:`two_l_mask`; the loss is ``Σ mask·mean_c(v̂ − (z1 − z0))² / max(Σ mask, 1)`` on
    the noisy half. With ``prompt_block_prob``, the first ``s`` tokens of some noisy blocks are
    clean (t = 0) and leave the loss, as a pinned prompt block does at inference.
    """
    fm_pass = flow_matching_pass(dit, z0, loss_mask, cfg, valid, generator)
    loss = fm_pass.mse()
    return loss, _fm_logs(fm_pass, loss)


def _fm_logs(fm_pass: FlowMatchingPass, loss: torch.Tensor) -> dict:
    return {"fm": loss.detach(), "t_mean": fm_pass.steps.mean().detach() / NUM_TRAIN_TIMESTEPS}


def rounding_loss(vae, fm_pass: FlowMatchingPass, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Diffusion-LM's rounding term ``−log p_θ(x | ẑ0)`` on the DiT's clean estimates; ``(ce, accuracy)``.

    The decoder reads ``[z0 | ẑ0]`` under :func:`two_l_mask`, so each estimated block is decoded beside
    the clean history it was predicted from (as the sampler decodes a finished block), and the
    cross-entropy of the estimate half against ``input_ids`` counts at ``fm_pass.weights``. Gradients
    reach the DiT through ``ẑ0``, pulling its estimates towards latents the decoder reads as the true token.
    """
    z0_hat = fm_pass.clean_estimate()
    bsz, length, _ = z0_hat.shape
    pos = torch.arange(length, device=z0_hat.device).expand(bsz, length)
    mask = two_l_mask(pos, fm_pass.block, fm_pass.valid)
    logits = vae.decode(torch.cat((fm_pass.z0, z0_hat), 1), position_ids=torch.cat((pos, pos), 1),
                        valid=torch.cat((fm_pass.valid, fm_pass.valid), 1), attention_mask=mask)
    patch = logits.shape[1] // (2 * length)
    logits = logits[:, length * patch:]  # (B, L·p, V): the estimate half
    weights = fm_pass.weights.repeat_interleave(patch, dim=1)
    return token_cross_entropy(logits, input_ids, weights), token_accuracy(logits.detach(), input_ids, weights)


class TokenHead(nn.Module):
    """Training-only linear probe ``LayerNorm → Linear`` from DiT hidden states ``(B, L/p, D)`` to token
    logits ``(B, L, V)`` (``p`` tokens per patch). It lives in the trainer's objective, not in the DiT, so
    saved priors keep the official layout."""

    def __init__(self, dim: int, vocab_size: int, patch_size: int = 1):
        super().__init__()
        self.vocab_size = vocab_size
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, patch_size * vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(hidden)).unflatten(-1, (-1, self.vocab_size)).flatten(1, 2)


@contextmanager
def block_output(dit, layer: int):
    """Inside the block, ``captured[0]`` holds the output of ``dit.blocks[layer]`` from the last forward."""
    blocks = dit.blocks
    if not -len(blocks) <= layer < len(blocks):
        raise ValueError(f"token_layer={layer} is out of range for a DiT with {len(blocks)} blocks; "
                         f"use -{len(blocks)}…{len(blocks) - 1}.")
    captured: list[torch.Tensor] = []

    def keep(_module, _args, out):
        captured[:] = [out]

    handle = blocks[layer].register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


def token_loss(head: TokenHead, hidden: torch.Tensor, fm_pass: FlowMatchingPass,
               input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``CE(head(h), x)`` on the noisy half of a 2L pass's hidden states ``(B, 2L/p, D)``; ``(ce, accuracy)``
    at ``fm_pass.weights``. The head sees each noisy token with its clean history, as the velocity does."""
    logits = head(hidden[:, hidden.shape[1] // 2:])  # (B, L, V)
    return token_cross_entropy(logits, input_ids, fm_pass.weights), token_accuracy(logits.detach(), input_ids, fm_pass.weights)


def self_condition_estimate(dit, z0: torch.Tensor, zt: torch.Tensor, timestep: torch.Tensor, block_size,
                            valid: torch.Tensor, prob: float, generator=None, history_drop=None) -> torch.Tensor:
    """Self-conditioning input of the noisy copy ``(B, L, C)``: ``ẑ0 = z_t − σ·v̂`` from a no-gradient pass
    that reads zeros, for a ``prob`` fraction of rows; zeros for the others (the sampler's first step)."""
    if prob <= 0:
        return torch.zeros_like(zt)
    with torch.no_grad():
        v = two_l_velocity(dit, z0, zt, timestep, block_size, valid, history_drop=history_drop)
        z0_hat = clean_estimate(zt, timestep, v.to(zt.dtype))
    use = torch.rand(zt.shape[0], generator=generator, device=zt.device) < prob  # (B,)
    return torch.where(use[:, None, None], z0_hat, torch.zeros_like(z0_hat))


def two_l_velocity(dit, z0: torch.Tensor, zt: torch.Tensor, timestep: torch.Tensor,
                   block_size: int | torch.Tensor, valid: torch.Tensor | None = None,
                   self_cond: torch.Tensor | None = None, history_drop: torch.Tensor | None = None) -> torch.Tensor:
    """DiT velocity on the noisy half of ``[z0 | z_t]`` ``(B, L, C)`` under :func:`two_l_mask`.

    ``timestep`` ``(B, L)`` on the 0…1000 scale for the noisy copy; the clean copy runs at 0. Equal to
    running the DiT block by block with a KV cache of the clean history (tested). For a
    ``self_condition`` DiT the clean copy reads itself and the noisy copy ``self_cond`` (zeros if None),
    as the sampler commits history with its own values.
    """
    bsz, length, _ = z0.shape
    pos = torch.arange(length, device=z0.device).expand(bsz, length)  # (B, L)
    valid = torch.ones(bsz, length, dtype=torch.bool, device=z0.device) if valid is None else valid.bool()
    sample = torch.cat((z0, zt), dim=1)  # (B, 2L, C)
    steps = torch.cat((torch.zeros_like(timestep), timestep), dim=1)  # (B, 2L)
    kwargs = {}
    if getattr(dit.config, "self_condition", False):
        kwargs["self_cond"] = torch.cat((z0, torch.zeros_like(zt) if self_cond is None else self_cond), dim=1)
    out = dit(sample, steps, position_ids=torch.cat((pos, pos), 1), valid=torch.cat((valid, valid), 1),
              attention_mask=two_l_mask(pos, block_size, valid, history_drop), **kwargs).sample
    return out[:, length:]  # (B, L, C)


def _history_drops(pos: torch.Tensor, block: torch.Tensor, prob: float, generator) -> torch.Tensor | None:
    """``(B, L)`` True for every token of blocks drawn with probability ``prob`` (None when 0: no draw,
    so runs without condition dropout keep their random streams)."""
    if prob <= 0:
        return None
    blk = pos // block[:, None]
    chosen = torch.rand(pos.shape, generator=generator, device=pos.device) < prob  # (B, n_blocks ≤ L)
    return torch.gather(chosen, 1, blk)


def _prompt_pins(pos: torch.Tensor, block: torch.Tensor, prob: float, generator) -> torch.Tensor:
    """``(B, L)`` True for the first ``s ∈ [1, bs−1]`` tokens of blocks chosen with probability ``prob``."""
    bsz, length = pos.shape
    if prob <= 0:
        return torch.zeros(bsz, length, dtype=torch.bool, device=pos.device)
    bs = block[:, None]  # (B, 1)
    n_blocks = length  # an upper bound of blocks per sample (block size >= 1)
    chosen = torch.rand(bsz, n_blocks, generator=generator, device=pos.device) < prob  # (B, nb)
    split = torch.rand(bsz, n_blocks, generator=generator, device=pos.device)
    split = 1 + (split * (bs - 1).clamp(min=0)).long()  # s in [1, bs-1] (bs=1 blocks are never pinned)
    blk, offset = pos // bs, pos % bs
    chosen = chosen & (bs > 1)
    return torch.gather(chosen, 1, blk) & (offset < torch.gather(split, 1, blk))


# --------------------------------------------------------------------------- Stage 2


def joint_loss(
    vae, dit, input_ids: torch.LongTensor, loss_mask: torch.Tensor | None = None,
    cfg: JointLossConfig | None = None, ref_vae=None, attention_mask=None,
    generator: torch.Generator | None = None, token_head: TokenHead | None = None,
) -> tuple[torch.Tensor, dict]:
    r"""Stage-2 loss ``λ_vae·L_VAE + λ_fm·L_FM + λ_round·L_round + λ_tok·L_tok + λ_ref·KL(q_φ ‖ q_φ_ref)``;
    ``(loss, logs)``.

    z0 = ``vae.normalize(z)``: the same normalised posterior sample (or mean) that the VAE terms decode.
    ``ref_vae`` is the frozen reference encoder (needed when ``ref_weight > 0``), ``token_head`` the
    :class:`TokenHead` (needed when ``token_weight > 0``). With ``cfg.freeze_vae`` the VAE runs without
    gradients and only the FM (+ rounding, token) terms are returned.
    """
    cfg = cfg or JointLossConfig()
    if cfg.freeze_vae:
        with torch.no_grad():
            posterior = vae.encode(input_ids, attention_mask)
            z = posterior.sample(generator) if cfg.fm_latents == "sample" else posterior.mode()
        total, logs = _prior_terms(vae, dit, vae.normalize(z), input_ids, loss_mask, cfg, generator, token_head)
        logs["loss"] = total.detach()
        return total, logs
    vae_total, logs, posterior, z = vae_terms(vae, input_ids, loss_mask, cfg.vae, attention_mask, generator)
    if cfg.fm_latents == "mean":
        z = vae.normalize(posterior.mode())
    z0 = z.detach() if cfg.detach_latents else z
    prior_total, prior_logs = _prior_terms(vae, dit, z0, input_ids, loss_mask, cfg, generator, token_head)
    logs.update(prior_logs)
    total = cfg.vae_weight * vae_total + prior_total
    if cfg.ref_weight > 0:
        if ref_vae is None:
            raise ValueError("ref_weight > 0 needs `ref_vae`, a frozen copy of the encoder; pass it or set ref_weight=0.")
        with torch.no_grad():
            ref = ref_vae.encode(input_ids, attention_mask)
        ref_kl = masked_mean(gaussian_kl(posterior, ref), loss_mask)
        total = total + cfg.ref_weight * ref_kl
        logs["ref_kl"] = ref_kl.detach()
    logs["loss"] = total.detach()
    return total, logs


def _prior_terms(vae, dit, z0, input_ids, loss_mask, cfg: JointLossConfig, generator,
                 token_head: TokenHead | None = None) -> tuple[torch.Tensor, dict]:
    """``λ_fm·L_FM + λ_round·L_round + λ_tok·L_tok`` from one DiT pass, with their logs."""
    if cfg.token_weight > 0 and token_head is None:
        raise ValueError("token_weight > 0 needs `token_head`, a TokenHead trained beside the DiT; pass it or "
                         "set token_weight=0.")
    capture = block_output(dit, cfg.token_layer) if cfg.token_weight > 0 else nullcontext()
    with capture as hidden:
        fm_pass = flow_matching_pass(dit, z0, loss_mask, cfg.fm, generator=generator)
    fm = fm_pass.mse()
    logs = _fm_logs(fm_pass, fm)
    total = cfg.fm_weight * fm
    if cfg.round_weight > 0:
        ce, acc = rounding_loss(vae, fm_pass, input_ids)
        total = total + cfg.round_weight * ce
        logs.update(round_ce=ce.detach(), round_acc=acc)
    if cfg.token_weight > 0:
        ce, acc = token_loss(token_head, hidden[0], fm_pass, input_ids)
        total = total + cfg.token_weight * ce
        logs.update(token_ce=ce.detach(), token_acc=acc)
    return total, logs


# --------------------------------------------------------------------------- latent statistics


@torch.no_grad()
def estimate_latent_stats(vae, batches) -> tuple[float, float]:
    """Scalar ``(shift, scale)`` = (mean, 1/std) of posterior-mode latents over ``batches``.

    ``batches`` yields ``(input_ids, loss_mask)`` pairs; only positions with ``loss_mask`` count.
    After ``vae.normalize`` the latents then have zero mean and unit variance (spec §4.2 "Latent
    normalisation").
    """
    total = total_sq = count = 0.0
    for input_ids, loss_mask in batches:
        z = vae.encode(input_ids).mode().double()  # (B, L, C)
        w = (torch.ones(input_ids.shape) if loss_mask is None else loss_mask).to(z).unsqueeze(-1)
        total += float((z * w).sum())
        total_sq += float((z.pow(2) * w).sum())
        count += float(w.sum()) * z.shape[-1]
    if count == 0:
        raise ValueError("estimate_latent_stats: no positions to average over (all loss_mask False?).")
    mean = total / count
    std = max(total_sq / count - mean**2, 1e-12) ** 0.5
    return mean, 1.0 / std


def store_latent_stats(vae, shift: float, scale: float) -> None:
    """Write ``shifting_factor`` / ``scaling_factor`` into the VAE config (saved with the model) and refit
    the decoder's input layer so that it decodes the newly normalised latents as before
    (:meth:`ColaTextVAE.set_latent_stats`)."""
    vae.set_latent_stats(shift, scale)
