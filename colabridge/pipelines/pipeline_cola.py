"""``ColaPipeline``: Cola DLM text generation as a diffusers ``DiffusionPipeline``.

Default numerics reproduce the official ``generate_task_repaint_inference`` (spec §5) token for token.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .. import checkpoints
from ..models import ColaDiT, ColaTextVAE
from ..data.text import pad_rows
from ..sampling.engine import (CachedStream, guided_velocity, num_passes, packed_guided_velocity, projected_velocity,
                               round_to, transport_in_passes)
from ..sampling.solvers import Solver, get_solver
from ..sampling.tokens import select_tokens
from .lora_mixin import ColaLoraLoaderMixin
from .prompting import PromptPlan, pad_to_blocks, plan_prompts

OUTPUT_TYPES = ("text", "ids", "latent")
SPECIAL_TOKENS = {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}  # OLMo-2 names used by the release
IM_END = "<|im_end|>"
NOISE_SAMPLE_STRIDE, NOISE_BLOCK_STRIDE = 1_000, 10_000_000  # official per-sample seed: S + id·1e3 + block·1e7


@dataclass
class ColaPipelineOutput(BaseOutput):
    """Output of :class:`ColaPipeline`.

    Attributes:
        texts: decoded ``sequences`` (``output_type="text"``), special tokens kept as the official code does.
        sequences: generated ids per sample after the trim of re-decoded prompt tokens.
        block_ids: ``(B, n_blocks·block_size)`` raw ids of every generated block, before the trim.
        latents: ``(B, n_blocks·block_size, C)`` transported (normalised) latents of every block.
        finished: ``(B,)`` whether each sample produced a stop id.
    """

    texts: list[str] | None
    sequences: list[list[int]] | None
    block_ids: torch.LongTensor | None
    latents: torch.Tensor
    finished: torch.BoolTensor


@dataclass
class ColaStreamChunk(BaseOutput):
    """One decoded block from :meth:`ColaPipeline.stream`: new ids (after the trim) and new text per sample."""

    block_index: int
    ids: list[list[int]]
    texts: list[str]
    latents: torch.Tensor
    finished: torch.BoolTensor


@dataclass
class _Block:
    index: int
    tokens: torch.LongTensor  # (B, bs)
    latents: torch.Tensor  # (B, bs, C)
    finished: torch.BoolTensor  # (B,)


@dataclass
class _Run:
    """Everything a block loop needs, prepared by ``ColaPipeline._start``."""

    plan: PromptPlan
    prior: CachedStream
    decoder: CachedStream
    num_blocks: int
    num_steps: int
    guidance_scale: float
    sampling: dict
    stop: torch.Tensor
    generator: torch.Generator | None
    noise_seed: int | None
    sample_ids: list[int] | None
    rounding: torch.dtype | None
    callback: object
    callback_inputs: list[str]
    pad_token_id: int
    solver: Solver
    scheduler: object
    packed_cfg: bool
    drop_finished: bool
    latents: torch.Tensor | None
    autocast_dtype: torch.dtype | None
    device: torch.device
    prompt_ids: list[list[int]]
    clamp_below: float | None
    sub_block_size: int


class ColaPipeline(DiffusionPipeline, ColaLoraLoaderMixin):
    r"""Block-wise latent text generation with a Cola text VAE and block-causal DiT prior.

    Components: ``vae`` (:class:`ColaTextVAE`), ``transformer`` (:class:`ColaDiT`), ``scheduler``
    (``FlowMatchEulerDiscreteScheduler``, used with explicit sigmas) and ``tokenizer`` (a fast tokenizer).
    LoRA adapters on the ``transformer``: :class:`ColaLoraLoaderMixin` (``load_lora_weights``, ``fuse_lora`` …).

    Pipeline config (saved in ``model_index.json``): ``clamp_below`` and ``sub_block_size``, the defaults of
    the call arguments of the same names (``None`` = the official sampler; a model's own folder may set
    values it was measured with).
    """

    model_cpu_offload_seq = "vae->transformer"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vae: ColaTextVAE,
        transformer: ColaDiT,
        scheduler: FlowMatchEulerDiscreteScheduler,
        tokenizer: PreTrainedTokenizerBase,
        clamp_below: float | None = None,
        sub_block_size: int | None = None,
    ):
        super().__init__()
        if clamp_below is not None and not (_is_real(clamp_below) and 0 < clamp_below <= 1):
            raise ValueError(f"`clamp_below` must be a noise level in (0, 1] or None, got {clamp_below!r}.")
        check_components(vae, transformer)
        _check_sub_block_size(sub_block_size, transformer.config.block_size)
        if tokenizer is not None and len(tokenizer) > vae.config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} ids but the VAE vocab_size is {vae.config.vocab_size}; "
                             "use the tokenizer the VAE was trained with.")
        self.register_modules(vae=vae, transformer=transformer, scheduler=scheduler, tokenizer=tokenizer)
        self.register_to_config(clamp_below=clamp_below, sub_block_size=sub_block_size)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "ColaPipeline":
        """Load a diffusers-layout folder, or the official release layout (``cola_dlm/cola_vae``,
        ``cola_dlm/cola_dit``, ``tokenizer.json``), detected automatically."""
        path = Path(pretrained_model_name_or_path)
        if path.is_dir() and checkpoints.is_official_layout(path):
            return cls.from_official(path, **kwargs)
        if path.is_dir() and not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{path}: neither a diffusers pipeline (model_index.json) nor an official Cola release "
                "(cola_dlm/cola_vae, cola_dlm/cola_dit, tokenizer.json)."
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_official(cls, path: str | os.PathLike, allow_pickle: bool = False, dtype: torch.dtype | None = None,
                      **components) -> "ColaPipeline":
        """Build from an official release folder; ``components`` override loaded ones."""
        path = Path(path)
        checkpoints.check_official_layout(path)
        if "vae" not in components:
            components["vae"] = checkpoints.model_from_official(ColaTextVAE, path / "cola_dlm" / "cola_vae", allow_pickle, dtype)
        if "transformer" not in components:
            components["transformer"] = checkpoints.model_from_official(ColaDiT, path / "cola_dlm" / "cola_dit", allow_pickle, dtype)
        components.setdefault("tokenizer", load_tokenizer(path / "tokenizer.json"))
        components.setdefault("scheduler", FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0))
        return cls(**components)

    # ------------------------------------------------------------------ properties
    @property
    def block_size(self) -> int:
        return self.transformer.config.block_size

    def default_stop_ids(self) -> list[int]:
        """The tokenizer's eos id plus ``<|im_end|>`` if the vocabulary has it (the benchmark's stop ids)."""
        ids = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        im_end = self.tokenizer.convert_tokens_to_ids(IM_END)
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id and im_end not in ids:
            ids.append(im_end)
        return ids

    # ------------------------------------------------------------------ steps
    def check_inputs(self, prompt, prompt_ids, max_new_tokens, num_inference_steps, guidance_scale, temperature,
                     top_k, top_p, output_type, pad_token_id, callback_tensor_inputs, sample_ids, clamp_below=None,
                     sub_block_size=None) -> None:
        if (prompt is None) == (prompt_ids is None):
            raise ValueError("Pass exactly one of `prompt` (str or list of str) and `prompt_ids` (list of id lists).")
        if prompt is not None:
            items = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, str) for p in items):
                raise TypeError(f"`prompt` must be a str or a non-empty list of str, got {type(prompt).__name__}"
                                f"{'' if not isinstance(prompt, (list, tuple)) else ' containing ' + ', '.join(sorted({type(p).__name__ for p in prompt}))}.")
        checks = [
            (_is_int(max_new_tokens) and max_new_tokens > 0, f"`max_new_tokens` must be a positive int, got {max_new_tokens!r}."),
            (_is_int(num_inference_steps) and num_inference_steps >= 1, f"`num_inference_steps` must be an int >= 1, got {num_inference_steps!r}."),
            (_is_real(guidance_scale) and guidance_scale >= 0, f"`guidance_scale` must be a number >= 0 (1 disables guidance), got {guidance_scale!r}."),
            (_is_real(temperature) and temperature >= 0, f"`temperature` must be a number >= 0 (0 = greedy), got {temperature!r}."),
            (top_k is None or (_is_int(top_k) and top_k >= 0), f"`top_k` must be an int >= 0 or None (0 disables it), got {top_k!r}."),
            (top_p is None or (_is_real(top_p) and 0 < top_p <= 1), f"`top_p` must be in (0, 1] or None, got {top_p!r}."),
            (clamp_below is None or (_is_real(clamp_below) and 0 <= clamp_below <= 1),
             f"`clamp_below` must be a noise level in [0, 1] (0 = off) or None (the pipeline's config), got {clamp_below!r}."),
            (output_type in OUTPUT_TYPES, f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}."),
            (pad_token_id is not None, "No pad id: pass `pad_token_id` or use a tokenizer with a pad token."),
            (set(callback_tensor_inputs) <= set(self._callback_tensor_inputs),
             f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        _check_sub_block_size(sub_block_size, self.block_size)
        n = len(prompt_ids) if prompt_ids is not None else (1 if isinstance(prompt, str) else len(prompt))
        if sample_ids is not None and len(sample_ids) != n:
            raise ValueError(f"`sample_ids` has {len(sample_ids)} entries for {n} prompts.")

    def tokenize(self, prompt: str | list[str]) -> list[list[int]]:
        """Prompt ids as the official ``tokenizer.encode(text).ids`` (post-processor included)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return [list(ids) for ids in self.tokenizer(prompts, add_special_tokens=True)["input_ids"]]

    def encode_prompt(self, prompt_ids: list[list[int]], pad_token_id: int) -> PromptPlan:
        """VAE-encode the block-padded prompts (posterior mode), normalise, and plan block 0."""
        lengths = [len(ids) for ids in prompt_ids]
        channels, bs = self.vae.config.latent_dim, self.block_size
        latents = None
        if max(lengths) > 0:
            input_ids, mask = pad_to_blocks(prompt_ids, bs, pad_token_id)
            device = self._execution_device
            posterior = self.vae.encode(input_ids.to(device), mask.to(device))
            latents = self.vae.normalize(posterior.mode().float())  # (B, Lmax, C), fp32 as the official
        return plan_prompts(latents, lengths, bs, channels)

    def prepare_latents(self, batch_size: int, block: int, generator, noise_seed, sample_ids, dtype, device=None) -> torch.Tensor:
        """Initial noise ``(B, bs, C)`` of one block.

        ``noise_seed`` reproduces the official per-sample scheme (CPU generator seeded with
        ``seed + id·1000 + block·1e7``, independent of the batch); otherwise ``generator`` drives it.
        """
        shape = (batch_size, self.block_size, self.vae.config.latent_dim)
        device = device or self._execution_device
        if noise_seed is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        ids = sample_ids if sample_ids is not None else range(batch_size)
        noise = [
            torch.randn(shape[1:], generator=torch.Generator().manual_seed(noise_seed + int(i) * NOISE_SAMPLE_STRIDE + block * NOISE_BLOCK_STRIDE))
            for i in ids
        ]
        return torch.stack(noise).to(device=device, dtype=dtype)

    def prepare_history(self, plan: PromptPlan, rounding, num_blocks: int) -> tuple[CachedStream, CachedStream]:
        """Caches of the prior and the decoder, prefilled with the prefix latents (spec §5.3 step 7).

        The prior sees bf16-rounded history at t=0; the decoder history stays float32.
        """
        bsz, device = plan.prefix.shape[0], self._execution_device
        # history + generated blocks + the scratch of one packed [cond | uncond] query
        capacity = plan.prefix.shape[1] + (num_blocks + 2) * self.block_size
        prior = CachedStream(self.transformer, self.transformer.new_cache(capacity), bsz, device, self.transformer.dtype)
        decoder = CachedStream(self.vae.decode, self.vae.new_cache(capacity), bsz, device, self.vae.dtype)
        if plan.prefix_valid.any():
            prefix = plan.prefix.to(device)
            valid = plan.prefix_valid.to(device)
            prefix_r = round_to(prefix, rounding)
            prior.prefill(prefix_r, valid, torch.zeros(valid.shape, device=device), **self._history_kwargs(prefix_r))
            decoder.prefill(prefix, valid)
        return prior, decoder

    @property
    def self_conditioned(self) -> bool:
        """True for a prior trained with self-conditioning (``transformer.config.self_condition``)."""
        return bool(getattr(self.transformer.config, "self_condition", False))

    def _history_kwargs(self, latents: torch.Tensor) -> dict:
        """Committed history is clean: a self-conditioned prior reads its own values as the estimate."""
        return {"self_cond": latents} if self.self_conditioned else {}

    def _numerics(self, autocast_dtype: torch.dtype | None):
        """``torch.autocast`` on the execution device's type, or a no-op context."""
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self._execution_device.type, dtype=autocast_dtype)

    def num_blocks(self, max_new_tokens: int, plan: PromptPlan) -> int:
        """⌈max_new_tokens / bs⌉, or 1 if any sample's budget does not fill its pinned block (official rule)."""
        bs = self.block_size
        if any(r and max_new_tokens < bs - r for r in plan.trim):
            return 1
        return math.ceil(max_new_tokens / bs)

    # ------------------------------------------------------------------ call
    @torch.inference_mode()
    def __call__(self, prompt: str | list[str] | None = None, *, return_dict: bool = True, **kwargs):
        r"""Generate text block by block; returns :class:`ColaPipelineOutput`.

        Args:
            prompt: one prompt or a list (``""`` = unconditional generation from an empty prefix).
            max_new_tokens: token budget, spent in whole blocks (⌈max_new_tokens / block_size⌉ blocks).
            num_inference_steps: Euler steps per block on the official grid ``linspace(1000, 0, N+1)``.
            guidance_scale: CFG scale ``s`` in ``v = s·(cond − uncond) + uncond``; cond sees the history,
                uncond the block alone. Block 0 of a sample with an empty prefix uses 1 (official rule).
            temperature, top_k, top_p: sampling (``temperature < 1e-5`` is greedy; ``top_k=0`` / ``top_p=1``
                disable the filters).
            repetition_penalty: applied to every id of earlier blocks, also in greedy mode.
            stop_token_ids: a sample is finished once a block contains one of them; generation stops
                when all are finished. Default: :meth:`default_stop_ids`.
            pad_token_id: id that pads prompts to whole blocks. Default: the tokenizer's pad token.
            prompt_ids: pre-tokenised prompts instead of ``prompt`` (e.g. chat-wrapped ids).
            sample_ids: ids used by the ``noise_seed`` scheme (default ``0…B-1``).
            generator: drives the noise (when ``noise_seed`` is None) and token sampling.
            noise_seed: official per-sample noise seeding (batch-independent).
            prior_input_rounding: dtype the prior's inputs (latents, timesteps, history) are rounded
                through; ``torch.bfloat16`` is the official algorithm, ``None`` disables rounding.
            output_type: ``"text"`` (texts + ids), ``"ids"`` or ``"latent"`` (latents only).
            callback_on_step_end: ``fn(pipe, step, timestep, {"latents": ...}) -> dict``; a returned
                ``"latents"`` replaces the block latents.
            latents: user noise for every block, ``(B, n_blocks, block_size, C)``; replaces the drawn noise.
            solver: ``"euler"`` (official, one DiT call per step) or ``"heun"`` (second order, 2N−1 calls).
            packed_cfg: run cond and uncond in one DiT forward (same maths; ``False`` = two passes).
            drop_finished: stop computing samples once they produced a stop id; their ``sequences`` end
                with the block that holds it (the official code keeps generating them).
            autocast_dtype: run the models under ``torch.autocast(<device type>, autocast_dtype)`` —
                ``torch.bfloat16`` with float32 weights on CUDA is the official GPU regime (spec §5.5).
            clamp_below: Diffusion-LM clamping (not in the official algorithm): at noise levels σ ≤
                ``clamp_below`` the clean estimate is replaced by the VAE re-encoding, in context, of its
                greedy decoded tokens, so each block ends on the latents of real tokens (Euler only). ``0`` = off;
                ``None`` = ``pipe.config.clamp_below`` (off unless the model folder sets it).
            sub_block_size: sequential sub-blocks (not in the official algorithm): each block is transported
                ⌈block_size / sub_block_size⌉ times from its noise; after each pass the next ``sub_block_size``
                free positions are pinned at the VAE latents of their greedy decoded tokens (re-encoded in
                context), as a prompt's partial block is, and the next pass generates the rest of the block
                given them. ``None`` = ``pipe.config.sub_block_size`` (``block_size``, one pass, unless the
                model folder sets it). Costs up to ``block_size / sub_block_size`` times the DiT calls.
        """
        output_type = kwargs.pop("output_type", "text")
        run = self._start(prompt, output_type=output_type, **kwargs)
        blocks = list(self._iter_blocks(run))
        output = self.postprocess(blocks, run.plan, output_type, run.drop_finished)
        self.maybe_free_model_hooks()
        return output if return_dict else output.to_tuple()

    @torch.inference_mode()
    def stream(self, prompt: str | list[str] | None = None, **kwargs):
        """Yield a :class:`ColaStreamChunk` per block as soon as it is decoded (same arguments as ``__call__``)."""
        run = self._start(prompt, output_type="text", **kwargs)
        texts = [""] * len(run.plan.trim)
        ids: list[list[int]] = [[] for _ in run.plan.trim]
        done_before = [False] * len(texts)
        for block in self._iter_blocks(run):
            new_ids = [[] if done else row for row, done in zip(block.tokens.tolist(), done_before)]
            done_before = block.finished.tolist() if run.drop_finished else done_before
            if block.index == 0:
                new_ids = [row[t:] for row, t in zip(new_ids, run.plan.trim)]
            ids = [old + new for old, new in zip(ids, new_ids)]
            full = self.tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            deltas = [f[len(t):] if f.startswith(t) else f for f, t in zip(full, texts)]
            texts = full
            yield ColaStreamChunk(block.index, new_ids, deltas, block.latents, block.finished.clone())

    def _start(
        self,
        prompt=None,
        max_new_tokens: int = 32,
        num_inference_steps: int = 16,
        guidance_scale: float = 7.0,
        temperature: float = 0.0,
        top_k: int | None = 50,
        top_p: float | None = 0.9,
        repetition_penalty: float = 1.1,
        stop_token_ids: int | list[int] | None = None,
        pad_token_id: int | None = None,
        prompt_ids: list[list[int]] | None = None,
        sample_ids: list[int] | None = None,
        generator: torch.Generator | None = None,
        noise_seed: int | None = None,
        prior_input_rounding: torch.dtype | None = torch.bfloat16,
        output_type: str = "text",
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        solver: str = "euler",
        packed_cfg: bool = True,
        drop_finished: bool = True,
        latents: torch.Tensor | None = None,
        autocast_dtype: torch.dtype | None = None,
        clamp_below: float | None = None,
        sub_block_size: int | None = None,
    ) -> "_Run":
        """Validate inputs, encode prompts and prefill the histories (steps 0–2 of a call)."""
        pad_token_id = self.tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        self.check_inputs(prompt, prompt_ids, max_new_tokens, num_inference_steps, guidance_scale, temperature,
                          top_k, top_p, output_type, pad_token_id, callback_on_step_end_tensor_inputs, sample_ids,
                          clamp_below, sub_block_size)
        clamp_below = self.config.clamp_below if clamp_below is None else (clamp_below or None)
        sub_block_size = sub_block_size or self.config.sub_block_size or self.block_size
        ids = self.tokenize(prompt) if prompt is not None else [list(p) for p in prompt_ids]
        numerics = self._numerics(autocast_dtype)
        with numerics:
            plan = self.encode_prompt(ids, pad_token_id)
        n_blocks = self.num_blocks(max_new_tokens, plan)
        if latents is not None and tuple(latents.shape) != (len(ids), n_blocks, self.block_size, self.vae.config.latent_dim):
            raise ValueError(f"`latents` must have shape (batch, n_blocks, block_size, latent_dim) = "
                             f"{(len(ids), n_blocks, self.block_size, self.vae.config.latent_dim)}, got {tuple(latents.shape)}.")
        if stop_token_ids is None:
            stop_token_ids = self.default_stop_ids()
        stop = torch.tensor([stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids), dtype=torch.long)
        with numerics:
            prior, decoder = self.prepare_history(plan, prior_input_rounding, n_blocks)
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=repetition_penalty, generator=generator)
        method = get_solver(solver)
        if clamp_below is not None and solver != "euler":
            raise ValueError(f"`clamp_below` needs solver='euler' (got {solver!r}): its velocity (z − P(ẑ0))/σ is exact for "
                             "Euler steps but a second-order solver averages it at σ near 0, where a token change is "
                             "amplified by 1/σ. Pass clamp_below=0 to turn clamping off for this solver.")
        scheduler = self.scheduler if isinstance(self.scheduler, method.scheduler_class) else method.make_scheduler()
        return _Run(plan, prior, decoder, n_blocks, num_inference_steps,
                    float(guidance_scale), sampling, stop, generator, noise_seed, sample_ids, prior_input_rounding,
                    callback_on_step_end, list(callback_on_step_end_tensor_inputs), pad_token_id, method, scheduler,
                    packed_cfg, drop_finished, latents, autocast_dtype, self._execution_device, ids, clamp_below,
                    sub_block_size)

    def _iter_blocks(self, run: "_Run"):
        """Step 3, one block per iteration: noise → transport → decode → choose tokens → commit.

        Finished samples leave the computation (``drop_finished``): their caches are sliced away and
        their later ids are ``pad``. Noise and sampling are still drawn for the full batch, so the
        random streams, and hence the other samples' tokens, do not depend on who finished.
        """
        plan, device, bsz = run.plan, run.device, run.plan.prefix.shape[0]
        active = torch.arange(bsz, device=device)
        history = None  # (B, n·bs) ids so far, full batch
        finished = torch.zeros(bsz, dtype=torch.bool, device=device)
        guidance = torch.full((bsz,), run.guidance_scale, device=device)
        guidance_0 = torch.where(plan.has_prefix.to(device), guidance, 1.0)  # no CFG on an empty prefix
        with self.progress_bar(total=run.num_blocks * self._calls_per_block(run)) as bar, self._numerics(run.autocast_dtype):
            for b in range(run.num_blocks):
                noise = self.prepare_latents(bsz, b, run.generator, run.noise_seed, run.sample_ids, torch.float32, device)
                if run.latents is not None:
                    noise = run.latents[:, b].to(device=device, dtype=torch.float32)
                z = self.transport_block(run, noise[active], (guidance_0 if b == 0 else guidance)[active], b, bar,
                                         self._token_projector(run, history, active, b))
                logits = torch.zeros(bsz, *z.shape[1:2], self.vae.config.vocab_size, device=device)
                logits[active] = run.decoder.query(z, commit=True).float()  # (B, bs, V)
                tokens = select_tokens(logits, history, **run.sampling)
                tokens[~torch.isin(torch.arange(bsz, device=device), active)] = run.pad_token_id
                history = tokens if history is None else torch.cat((history, tokens), 1)
                block_latents = torch.zeros(bsz, *z.shape[1:], device=device)
                block_latents[active] = z
                finished = finished | torch.isin(tokens, run.stop).any(1)
                yield _Block(b, tokens, block_latents, finished)
                if b == run.num_blocks - 1 or bool(finished.all()):
                    break
                keep = ~finished[active] if run.drop_finished else torch.ones_like(active, dtype=torch.bool)
                if not bool(keep.all()):
                    active, z = active[keep], z[keep]
                    run.prior.select(keep.nonzero().squeeze(1))
                    run.decoder.select(keep.nonzero().squeeze(1))
                z_r = round_to(z, run.rounding)
                run.prior.query(z_r, torch.zeros(z.shape[:2], device=device), commit=True, **self._history_kwargs(z_r))

    def transport_block(self, run: "_Run", noise: torch.Tensor, guidance: torch.Tensor, block: int, bar,
                        project=None) -> torch.Tensor:
        """Transport one block of the active samples from noise to latents with the shared engine
        (``project``: optional clamping of the clean estimate, :func:`projected_velocity`)."""
        plan, device = run.plan, run.device
        pinned = values = None
        if block == 0 and plan.any_pinned:
            pinned, values = plan.pinned.to(device), plan.pinned_values.to(device)
        make = packed_guided_velocity if run.packed_cfg else guided_velocity
        extra = (noise.shape[1],) if run.packed_cfg else ()
        velocity = make(self.transformer, run.prior, guidance, *extra, input_rounding=run.rounding,
                        self_condition=self.self_conditioned)
        if run.clamp_below is not None:
            velocity = projected_velocity(velocity, project, run.clamp_below)
        on_step = self._step_callback(run.callback, run.callback_inputs, block * self._calls_per_block(run), bar)
        # a prompt's pinned tokens can leave fewer passes in block 0; the bar still counts the full block
        passes = num_passes(pinned, self.block_size, run.sub_block_size)
        bar.update(self._calls_per_block(run) - passes * run.solver.model_calls(run.num_steps))
        return transport_in_passes(velocity, noise, run.scheduler, run.solver.schedule(run.num_steps), project,
                                   run.sub_block_size, pinned, values, on_step)

    def _calls_per_block(self, run: "_Run") -> int:
        """DiT calls (progress-bar steps) of a block with nothing pinned."""
        return num_passes(None, self.block_size, run.sub_block_size) * run.solver.model_calls(run.num_steps)

    def _token_projector(self, run: "_Run", history: torch.Tensor | None, active: torch.Tensor, block: int):
        """The projection of ``clamp_below`` and ``sub_block_size`` for one block of the active samples:
        clean latents → greedy decoder tokens (prompt tokens where pinned) → VAE posterior mode of the
        block, encoded after the sample's tokens so far (prompt, then generated blocks) → normalised."""
        if run.clamp_below is None and run.sub_block_size >= self.block_size:
            return None
        bs, rows, trim, prompts = self.block_size, active.tolist(), run.plan.trim, run.prompt_ids
        pinned = pinned_ids = None
        if block == 0:  # the prompt's complete blocks; its partial last block is pinned in this one
            context = [prompts[i][: len(prompts[i]) - trim[i]] for i in rows]
            pinned = run.plan.pinned[rows].to(run.device)
            pinned_ids = pad_rows([prompts[i][len(prompts[i]) - trim[i]:] for i in rows], bs, 0)[0].to(run.device)
        else:  # the whole prompt, then the generated ids after its re-decoded tokens
            context = [prompts[i] + history[i, trim[i]:].tolist() for i in rows]

        def project(z0: torch.Tensor) -> torch.Tensor:
            tokens = run.decoder.query(z0).float().argmax(-1)  # (A, bs)
            if pinned is not None:
                tokens = torch.where(pinned, pinned_ids, tokens)
            seqs = [c + t for c, t in zip(context, tokens.tolist())]
            ids, mask = pad_rows(seqs, max(map(len, seqs)), run.pad_token_id)
            latents = self.vae.normalize(self.vae.encode(ids.to(run.device), mask.to(run.device)).mode().float())
            ends = torch.tensor([len(s) for s in seqs], device=run.device)
            index = (ends[:, None] - bs + torch.arange(bs, device=run.device))[..., None]
            return latents.gather(1, index.expand(-1, -1, latents.shape[-1]))

        return project

    def _step_callback(self, callback, tensor_inputs, offset: int, bar):
        def on_step(i, t, latents):
            bar.update()
            if callback is None:
                return latents
            kwargs = {}
            for name in tensor_inputs:
                kwargs[name] = latents
            out = callback(self, offset + i, t, kwargs) or {}
            return out.get("latents", latents)

        return on_step

    def postprocess(self, blocks: list["_Block"], plan: PromptPlan, output_type: str, truncate: bool = True) -> ColaPipelineOutput:
        """Step 4: concatenate blocks, trim re-decoded prompt tokens (and, with ``truncate``, the pad ids
        after a finished sample's last block), decode text."""
        block_ids = torch.cat([b.tokens for b in blocks], 1)
        latents = torch.cat([b.latents for b in blocks], 1)
        finished = blocks[-1].finished
        if output_type == "latent":
            return ColaPipelineOutput(None, None, None, latents, finished)
        ends = _computed_lengths(blocks) if truncate else [block_ids.shape[1]] * block_ids.shape[0]
        sequences = [row[trim:end] for row, trim, end in zip(block_ids.tolist(), plan.trim, ends)]
        texts = None
        if output_type == "text":
            texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return ColaPipelineOutput(texts, sequences, block_ids, latents, finished)


def _check_sub_block_size(value, block_size: int) -> None:
    if value is not None and not (_is_int(value) and 1 <= value <= block_size):
        raise ValueError(f"`sub_block_size` must be an int in [1, block_size={block_size}] or None (the pipeline's "
                         f"config; block_size = one pass, the official sampler), got {value!r}.")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _computed_lengths(blocks: list["_Block"]) -> list[int]:
    """Per sample, the number of ids up to the end of the block in which it finished (or all)."""
    bs = blocks[0].tokens.shape[1]
    done_at = [len(blocks)] * blocks[0].tokens.shape[0]
    for block in reversed(blocks):
        for i, f in enumerate(block.finished.tolist()):
            if f:
                done_at[i] = block.index + 1
    return [n * bs for n in done_at]


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """A fast tokenizer from ``tokenizer.json``, with the release's eos/pad tokens set when present."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer file not found (expected a tokenizers `tokenizer.json`).")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
    vocab = tokenizer.get_vocab()
    tokenizer.add_special_tokens({k: v for k, v in SPECIAL_TOKENS.items() if v in vocab})
    return tokenizer


def check_components(vae: ColaTextVAE, transformer: ColaDiT) -> None:
    """Cross-model constraints the official code never checks (spec §7.15, §7.23)."""
    latent, cin, cout = vae.config.latent_dim, transformer.config.txt_in_channels, transformer.config.txt_out_channels
    if not latent == cin == cout:
        raise ValueError(
            f"VAE latent_dim={latent} must equal the transformer's txt_in_channels={cin} and "
            f"txt_out_channels={cout}: the prior models the VAE's latents. Use a matching pair."
        )
    if vae.config.block_size != transformer.config.block_size:
        raise ValueError(
            f"VAE block_size={vae.config.block_size} != transformer block_size={transformer.config.block_size}: "
            "the decoder's blocks must line up with the generation blocks."
        )
    if vae.config.patch_size != 1 or transformer.config.patch_size != 1:
        raise ValueError("Block-wise generation needs patch_size=1 in both models (the official inference "
                         "is incoherent for patch_size > 1, spec §7.15).")
