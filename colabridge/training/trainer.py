r"""accelerate trainer for Cola Stage 1 (VAE) and Stage 2 (joint VAE + DiT, or DiT-only on a frozen VAE).

One code path for one process, DDP, FSDP or DeepSpeed: the run is an ``Accelerator`` with gradient
accumulation; the model handed to ``accelerator.prepare`` is an :class:`Objective` module whose
``forward`` returns ``(loss, logs)``, so DDP's gradient hooks see every parameter the loss uses.

Exact resume. The data order is a pure function of ``(seed, micro-step)`` (:class:`BatchPlan`), the
random streams (posterior noise, timesteps, z1) use the global RNGs that ``save_state`` stores per
process, and checkpoints are written to a temporary folder then renamed (``checkpoint-<step>``,
:mod:`.checkpointing`), so a run killed at any moment resumes from its last complete checkpoint and
reproduces the losses of an uninterrupted run.

Outputs under ``output_dir``: ``tokenizer.json``, ``losses.csv`` + ``losses.png``, ``eval.jsonl``,
``checkpoints/checkpoint-<step>/``, and at the end ``vae/`` (+ ``transformer/`` and ``pipeline/``
for Stage 2). With ``ema`` set, each checkpoint also holds the EMA weights (``ema.safetensors``), the
held-out evaluation is written for both weight sets (``ema_``-prefixed for the average), and the
final exports hold the EMA weights, as diffusers' training scripts do.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..models import ColaDiT, ColaTextVAE
from . import losses as L
from .checkpointing import (
    checkpoint_dir, latest_checkpoint, load_latest_checkpoint, load_model_weights, save_checkpoint,
)
from .curves import LossLog, plot_losses
from .ema import EMAWeights, check_ema_options, has_ema, load_ema_into
from .optim import OptimConfig, build_optimizer

STAGES = ("vae", "joint", "lora")
EPOCH_SEED_STRIDE = 100_003  # permutation seed of epoch e: seed·stride + e (distinct across seeds and epochs)
EVAL_BATCH = 64  # rows per forward pass in evaluation and latent statistics
STAT_ROWS = 1024  # training rows used to estimate the latent shift/scale


# --------------------------------------------------------------------------- config


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut (see :mod:`colabridge.data.text`).

    Attributes:
        source: ``"wordnet"`` (Debian wordnet-base), ``"austen"`` (novel ``book`` of the unpacked
            Debian r-cran-janeaustenr at ``path``), ``"lines"`` (a text file at ``path``, one sentence a
            line) or ``"texts"`` (the inline list ``texts``).
        tokenizer: an existing ``tokenizer.json``; None trains a byte-level BPE of ``vocab_size``.
        seq_len: row length in tokens (a multiple of the block size).
        holdout_fraction: share of sentences held out for evaluation (hash split, deterministic).
    """

    source: str = "wordnet"
    path: str | None = None
    texts: list[str] = field(default_factory=list)
    book: str = "prideprejudice"
    tokenizer: str | None = None
    vocab_size: int = 4096
    seq_len: int = 64
    holdout_fraction: float = 0.02


@dataclass
class TrainConfig:
    """A whole run, read from JSON (every field optional except what the stage needs).

    Attributes:
        stage: ``"vae"`` (Stage 1), ``"joint"`` (Stage 2; ``loss.freeze_vae`` = DiT-only) or ``"lora"``
            (a LoRA adapter on the DiT of ``init_pipeline``, everything else frozen).
        vae, dit: constructor kwargs of a fresh :class:`ColaTextVAE` / :class:`ColaDiT`
            (``vocab_size`` defaults to the tokenizer's size).
        init_vae, init_dit: folders saved by ``save_pretrained`` to start from instead; with ``init_dit``,
            ``dit`` may add config options whose new weights start at their own init (``self_condition``).
        init_pipeline: a pipeline folder (``vae/``, ``transformer/``, ``tokenizer/``); the base of ``"lora"``.
        lora: :func:`colabridge.training.lora.lora_config` kwargs (``r``, ``alpha``, ``target_modules``).
        latent_stats: ``"estimate"`` (Stage 2: measure shift/scale on training rows before training
            and store them in the VAE config) or ``"keep"``.
        batch_size: micro-batch per process; the optimizer step sees
            ``batch_size · grad_accum · num_processes`` rows.
        max_steps: optimizer steps of the whole run (the LR schedule's horizon).
        save_every / keep_checkpoints: checkpoint period (optimizer steps) and how many to keep.
        eval_every / eval_rows: held-out evaluation period and size (0 = only at the end).
        ema: ``diffusers.training_utils.EMAModel`` options (e.g. ``{"decay": 0.999}``) to keep an
            exponential moving average of the trained weights; ``{}`` keeps none.
    """

    stage: str = "vae"
    output_dir: str = "runs/cola"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    vae: dict = field(default_factory=dict)
    dit: dict = field(default_factory=dict)
    init_vae: str | None = None
    init_dit: str | None = None
    init_pipeline: str | None = None
    lora: dict = field(default_factory=dict)
    latent_stats: str = "estimate"
    loss: dict = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 1000
    save_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0
    eval_rows: int = 256
    mixed_precision: str = "no"
    num_threads: int | None = 1
    ema: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r}: use one of {STAGES}.")
        if self.latent_stats not in ("estimate", "keep"):
            raise ValueError(f"latent_stats={self.latent_stats!r}: use 'estimate' or 'keep'.")
        if isinstance(self.data, dict):
            self.data = DataConfig(**self.data)
        if isinstance(self.optim, dict):
            self.optim = OptimConfig(**self.optim)
        check_ema_options(self.ema)
        if self.stage == "lora" and self.init_pipeline and not self.data.tokenizer:
            self.data.tokenizer = str(Path(self.init_pipeline) / "tokenizer" / "tokenizer.json")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "TrainConfig":
        return cls(**json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        return asdict(self)

    def loss_config(self):
        if self.stage == "vae":
            return L.VAELossConfig(**self.loss)
        if self.stage == "lora":
            return L.JointLossConfig.from_dict({**self.loss, "freeze_vae": True})
        return L.JointLossConfig.from_dict(self.loss)


# --------------------------------------------------------------------------- data


@dataclass
class TextRows:
    """Packed token rows ``ids`` ``(N, seq_len)`` with ``real`` ``(N, seq_len)`` (False on padding)."""

    ids: torch.Tensor
    real: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]


def load_texts(cfg: DataConfig) -> list[str]:
    from ..data import text

    if cfg.source == "wordnet":
        return text.read_wordnet()
    if cfg.source == "austen":
        if not cfg.path:
            raise ValueError("data.source='austen' needs data.path, the folder r-cran-janeaustenr_*.deb was unpacked into.")
        return text.read_janeaustenr(cfg.path, cfg.book)
    if cfg.source == "lines":
        if not cfg.path:
            raise ValueError("data.source='lines' needs data.path, a UTF-8 text file with one sentence per line.")
        return text.read_lines(cfg.path)
    if cfg.source == "texts":
        if not cfg.texts:
            raise ValueError("data.source='texts' needs a non-empty data.texts list.")
        return list(cfg.texts)
    raise ValueError(f"data.source={cfg.source!r}: use 'wordnet', 'austen', 'lines' or 'texts'.")


def prepare_data(cfg: DataConfig, output_dir: Path, accelerator):
    """Tokenizer (loaded, or trained on the training split by the main process) and packed rows.

    Returns ``(tokenizer, train_rows, heldout_rows)``.
    """
    from tokenizers import Tokenizer

    from ..data import text

    train_texts, held_texts = text.split_holdout(load_texts(cfg), cfg.holdout_fraction)
    tok_path = Path(cfg.tokenizer) if cfg.tokenizer else output_dir / "tokenizer.json"
    if not cfg.tokenizer and accelerator.is_main_process and not tok_path.is_file():
        text.train_tokenizer(train_texts, cfg.vocab_size).save(str(tok_path))
    accelerator.wait_for_everyone()
    tokenizer = Tokenizer.from_file(str(tok_path))
    eos, pad = tokenizer.token_to_id(text.EOS), tokenizer.token_to_id(text.PAD)
    if eos is None or pad is None:
        raise ValueError(f"{tok_path}: tokenizer lacks {text.EOS} or {text.PAD}; train it with colabridge.data.text.")
    rows = [TextRows(*text.pack_sentences(text.encode_texts(tokenizer, t), cfg.seq_len, eos, pad)) if t else None
            for t in (train_texts, held_texts)]
    return tokenizer, rows[0], rows[1]


class BatchPlan:
    """Deterministic data order: micro-step ``m`` of rank ``r`` reads rows of a seeded permutation.

    Each epoch is a fresh permutation (seeded by ``seed`` and the epoch) cut into global batches of
    ``batch_size · world`` rows (the remainder is dropped); rank ``r`` takes its contiguous slice.
    The position is just ``m``, so resuming needs nothing but the step counter.
    """

    def __init__(self, num_rows: int, batch_size: int, world: int, rank: int, seed: int):
        self.global_batch = batch_size * world
        if num_rows < self.global_batch:
            raise ValueError(f"only {num_rows} training rows for a global batch of {self.global_batch}; "
                             "lower batch_size or add data.")
        self.num_rows, self.batch_size, self.rank, self.seed = num_rows, batch_size, rank, seed
        self.per_epoch = num_rows // self.global_batch
        self._epoch, self._perm = None, None

    def indices(self, micro_step: int) -> torch.Tensor:
        epoch, i = divmod(micro_step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_rows, generator=g)
        start = i * self.global_batch + self.rank * self.batch_size
        return self._perm[start : start + self.batch_size]


# --------------------------------------------------------------------------- models


class Objective(nn.Module):
    """The trained modules plus the loss: ``forward(ids, real) -> (loss, logs)``.

    ``ref_vae`` (Stage 2) is a frozen copy of the starting encoder for ``KL(q_φ ‖ q_φ_ref)``; a Stage-2
    objective with ``token_weight > 0`` also trains a :class:`~colabridge.training.losses.TokenHead`
    (checkpointed with the run, never exported).
    """

    def __init__(self, stage: str, loss_cfg, vae: ColaTextVAE, dit: ColaDiT | None = None, ref_vae=None):
        super().__init__()
        self.stage, self.loss_cfg = stage, loss_cfg
        self.vae, self.dit, self.ref_vae = vae, dit, ref_vae
        self.token_head = None
        if dit is not None and loss_cfg.token_weight > 0:  # a Stage-2 or LoRA objective
            self.token_head = L.TokenHead(dit.config.txt_dim, vae.config.vocab_size, dit.config.patch_size)

    def forward(self, input_ids: torch.Tensor, real: torch.Tensor):
        if self.stage == "vae":
            return L.vae_loss(self.vae, input_ids, real, self.loss_cfg)
        return L.joint_loss(self.vae, self.dit, input_ids, real, self.loss_cfg, self.ref_vae, token_head=self.token_head)


def load_dit(folder: str, overrides: dict) -> ColaDiT:
    """``ColaDiT.from_pretrained(folder)`` with config ``overrides``.

    Overrides may only add modules that start from their own initialisation: ``self_condition``
    (``sc_in``, zero-initialised) and a deeper stack, ``num_layers`` = k × the stored depth, which
    :func:`grow_dit` fills with identity blocks. Any other missing, unexpected or reshaped weight raises,
    since it would silently train from random values.
    """
    if not overrides:
        return ColaDiT.from_pretrained(folder)
    stored = ColaDiT.load_config(folder)["num_layers"]
    depth = overrides.get("num_layers", stored)
    if depth != stored:
        return grow_dit(load_dit(folder, {k: v for k, v in overrides.items() if k != "num_layers"}), depth)
    dit, info = ColaDiT.from_pretrained(folder, low_cpu_mem_usage=False, output_loading_info=True,
                                        ignore_mismatched_sizes=True, **overrides)
    new = [k for k in info["missing_keys"] if not k.startswith("sc_in.")]
    bad = new + list(info["unexpected_keys"]) + [k for k, *_ in info["mismatched_keys"]]
    if bad:
        raise ValueError(f"dit overrides {overrides} do not fit the weights in {folder}: {sorted(bad)[:6]} would not "
                         "be loaded. Only overrides that add new modules (self_condition, num_layers = k × stored) "
                         "can start from init_dit.")
    return dit


def grow_dit(dit: ColaDiT, num_layers: int) -> ColaDiT:
    """A ``num_layers``-deep copy of ``dit`` computing the same function: stored block ``i`` becomes block
    ``k·i`` (k = num_layers / depth) and the k − 1 blocks after it are new, with their adaLN-Zero gates at
    zero, so they pass their input through until training opens them (depth growth of a trained prior)."""
    depth = dit.config.num_layers
    if num_layers % depth or num_layers < depth:
        raise ValueError(f"dit num_layers={num_layers}: a grown prior needs a multiple of the stored depth {depth}.")
    k = num_layers // depth
    grown = ColaDiT.from_config({**dit.config, "num_layers": num_layers})
    state = {}
    for name, value in dit.state_dict().items():
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            name = f"blocks.{k * int(i)}.{rest}"
        state[name] = value
    missing, unexpected = grown.load_state_dict(state, strict=False)
    assert not unexpected and all(m.startswith("blocks.") for m in missing), (missing, unexpected)
    return grown


def build_objective(cfg: TrainConfig, vocab_size: int, train_rows: TextRows) -> Objective:
    """Fresh or loaded models, the frozen reference encoder and (Stage 2) latent statistics."""
    if cfg.stage == "lora":
        return build_lora_objective(cfg)
    vae = ColaTextVAE.from_pretrained(cfg.init_vae) if cfg.init_vae else ColaTextVAE(**{"vocab_size": vocab_size, **cfg.vae})
    if vae.config.vocab_size < vocab_size:
        raise ValueError(f"VAE vocab_size={vae.config.vocab_size} is smaller than the tokenizer's {vocab_size}.")
    loss_cfg = cfg.loss_config()
    if cfg.stage == "vae":
        return Objective("vae", loss_cfg, vae.train())
    if cfg.latent_stats == "estimate":
        fit_latent_stats(vae, train_rows)
    if cfg.init_dit:
        dit = load_dit(cfg.init_dit, cfg.dit)
    else:
        dit = ColaDiT(**{"txt_in_channels": vae.config.latent_dim, "txt_out_channels": vae.config.latent_dim,
                         "block_size": vae.config.block_size, **cfg.dit})
    ref = None
    if loss_cfg.freeze_vae:
        vae.requires_grad_(False).eval()
    else:
        vae.train()
        if loss_cfg.ref_weight > 0:
            ref = copy.deepcopy(vae).requires_grad_(False).eval()
    return Objective("joint", loss_cfg, vae, dit.train(), ref)


def fit_latent_stats(vae: ColaTextVAE, rows: TextRows) -> None:
    """Measure the latent shift/scale on the first training rows and store them in the VAE; the decoder
    input layer is refitted so it decodes the newly normalised latents as before (``store_latent_stats``)."""
    L.store_latent_stats(vae, *L.estimate_latent_stats(vae.eval(), stat_batches(rows)))


def stat_batches(rows: TextRows, max_rows: int = STAT_ROWS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``max_rows`` training rows as ``(ids, real)`` batches for the latent statistics."""
    n = min(len(rows), max_rows)
    return [(rows.ids[i : i + EVAL_BATCH], rows.real[i : i + EVAL_BATCH]) for i in range(0, n, EVAL_BATCH)]


def build_lora_objective(cfg: TrainConfig) -> Objective:
    """Frozen VAE + frozen DiT of ``init_pipeline`` with a trainable LoRA adapter on the DiT."""
    from .lora import add_lora, lora_config

    if not cfg.init_pipeline:
        raise ValueError("stage 'lora' needs init_pipeline, a pipeline folder with vae/ and transformer/.")
    vae = ColaTextVAE.from_pretrained(cfg.init_pipeline, subfolder="vae").requires_grad_(False).eval()
    dit = ColaDiT.from_pretrained(cfg.init_pipeline, subfolder="transformer")
    add_lora(dit, lora_config(**cfg.lora))
    return Objective("lora", cfg.loss_config(), vae, dit.train())


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(objective: Objective, rows: TextRows | None, max_rows: int, seed: int) -> dict:
    """Held-out metrics: token reconstruction accuracy / CE from the posterior mode, and (Stage 2)
    the flow-matching loss under a fixed generator (the global RNG is left untouched)."""
    if rows is None or len(rows) == 0:
        return {}
    vae, was_training = objective.vae, objective.training
    objective.eval()
    ids, real = rows.ids[:max_rows], rows.real[:max_rows]
    correct = ce = fm = count = 0.0
    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(ids), EVAL_BATCH):
        b_ids, b_real = ids[i : i + EVAL_BATCH], real[i : i + EVAL_BATCH]
        z = vae.normalize(vae.encode(b_ids).mode())  # the decoder's input space, as in the pipeline
        logits = vae.decode(z)
        n = float(b_real.sum())
        correct += float(L.token_accuracy(logits, b_ids, b_real)) * n
        ce += float(L.token_cross_entropy(logits, b_ids, b_real)) * n
        if objective.dit is not None:
            fm_cfg = objective.loss_cfg.fm
            fm += float(L.flow_matching_loss(objective.dit, z, b_real, fm_cfg, generator=g)[0]) * n
        count += n
    objective.train(was_training)
    out = {"heldout_recon_acc": correct / count, "heldout_recon_ce": ce / count}
    if objective.dit is not None:
        out["heldout_fm"] = fm / count
    return out


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, resume: bool = False, stop_at_step: int | None = None) -> Objective:
    """Run (or resume) ``cfg``; returns the unwrapped :class:`Objective`.

    ``stop_at_step`` ends this invocation after that optimizer step (with a checkpoint), leaving the
    schedule horizon ``max_steps`` unchanged, so a long run can be split into sessions.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.output_dir)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)  # identical initial weights on every rank
    tokenizer, train_rows, held_rows = prepare_data(cfg.data, out, accelerator)
    objective = build_objective(cfg, tokenizer.get_vocab_size(), train_rows)
    params = [p for p in objective.parameters() if p.requires_grad]
    # the scheduler is stepped by hand once per optimizer step (not prepared: accelerate would step it
    # num_processes times per step), and checkpointed alongside
    optimizer, scheduler = build_optimizer(params, cfg.optim, cfg.max_steps)
    model, optimizer = accelerator.prepare(objective, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    set_seed(cfg.seed + accelerator.process_index)  # per-rank noise streams
    ema = EMAWeights(objective, **cfg.ema) if cfg.ema else None
    state = load_latest_checkpoint(accelerator, out) if resume else None
    step = state["step"] if state else 0
    if ema is not None and state:
        resume_ema(ema, state["path"])
    plan = BatchPlan(len(train_rows), cfg.batch_size, accelerator.num_processes, accelerator.process_index, cfg.seed)
    log = LossLog(out / "losses.csv", accelerator.is_main_process, step)
    last = cfg.max_steps if stop_at_step is None else min(cfg.max_steps, stop_at_step)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not accelerator.is_main_process, desc=f"train {cfg.stage}")
    start = time.time()
    while step < last:
        logs = train_step(accelerator, model, optimizer, scheduler, plan, train_rows, step, cfg)
        if ema is not None:
            ema.step()
        step += 1
        bar.update()
        if step % cfg.log_every == 0 or step == last:
            row = {"step": step, "lr": scheduler.get_last_lr()[0], **logs, "elapsed_s": round(time.time() - start, 2)}
            log.append(row)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "recon", "fm", "acc")})
        if cfg.eval_every and step % cfg.eval_every == 0 and accelerator.is_main_process:
            _write_eval(out, step, evaluate_with_ema(accelerator.unwrap_model(model), ema, held_rows, cfg))
        if step % cfg.save_every == 0 or step == last:
            save_checkpoint(accelerator, out, step, cfg.keep_checkpoints, write_files=ema.save if ema else None)
    bar.close()
    unwrapped = accelerator.unwrap_model(model)
    if step >= cfg.max_steps:
        metrics = evaluate_with_ema(unwrapped, ema, held_rows, cfg) if accelerator.is_main_process else {}
        if ema is not None:  # the run's result is the average (on every rank: it changes parameters)
            ema.model.copy_to(ema.params)
        if cfg.stage == "vae" and cfg.latent_stats == "estimate":
            fit_latent_stats(unwrapped.vae, train_rows)
        if accelerator.is_main_process:
            finish(cfg, unwrapped, out, held_rows, step, metrics)
    accelerator.wait_for_everyone()
    return unwrapped


def train_step(accelerator, model, optimizer, scheduler, plan: BatchPlan, rows: TextRows, step: int, cfg) -> dict:
    """One optimizer step over ``grad_accum`` micro-batches; returns logs averaged over micro-batches
    and processes."""
    totals: dict[str, torch.Tensor] = {}
    for micro in range(cfg.grad_accum):
        idx = plan.indices(step * cfg.grad_accum + micro)
        ids, real = rows.ids[idx].to(accelerator.device), rows.real[idx].to(accelerator.device)
        with accelerator.accumulate(model):
            loss, logs = model(ids, real)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.optim.grad_clip:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                logs["grad_norm"] = torch.as_tensor(grad_norm).detach().float()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for k, v in logs.items():
            totals[k] = totals.get(k, 0.0) + v.float() / cfg.grad_accum
    scheduler.step()
    names = sorted(totals)
    stacked = accelerator.reduce(torch.stack([torch.as_tensor(totals[k]) for k in names]).to(accelerator.device), "mean")
    return {k: float(v) for k, v in zip(names, stacked)}


def resume_ema(ema: EMAWeights, checkpoint: Path) -> None:
    """Load the checkpoint's EMA weights; a checkpoint written without EMA starts the average here."""
    if has_ema(checkpoint):
        ema.load(checkpoint)
    else:
        print(f"[colabridge train] {checkpoint.name} holds no EMA weights: the EMA starts from its weights now.")


def evaluate_with_ema(objective: Objective, ema: EMAWeights | None, rows: TextRows | None, cfg: TrainConfig) -> dict:
    """:func:`evaluate` of the trained weights, plus the same metrics of the EMA weights (``ema_`` prefix)."""
    metrics = evaluate(objective, rows, cfg.eval_rows, cfg.seed)
    if ema is not None:
        with ema.applied():
            metrics.update({"ema_" + k: v for k, v in evaluate(objective, rows, cfg.eval_rows, cfg.seed).items()})
    return metrics


def _write_eval(out: Path, step: int, metrics: dict) -> None:
    with (out / "eval.jsonl").open("a") as fh:
        fh.write(json.dumps({"step": step, **metrics}) + "\n")


def finish(cfg: TrainConfig, objective: Objective, out: Path, held_rows, step: int, metrics: dict) -> None:
    """Write the final evaluation ``metrics`` and the loss curve, and export the models as they are now
    (``vae/``, ``transformer/``, ``pipeline/``, or ``adapter/``)."""
    _write_eval(out, step, metrics)
    print(f"[colabridge train] step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    note = plot_losses(out / "losses.csv", out / "losses.png")
    if note:
        print(f"[colabridge train] {note}")
    if cfg.stage == "lora":
        finish_lora(objective, out, held_rows, cfg, step)
        return
    vae = objective.vae
    vae.save_pretrained(out / "vae")
    if objective.dit is not None:
        objective.dit.save_pretrained(out / "transformer")
        export_pipeline(vae, objective.dit, out / "tokenizer.json" if not cfg.data.tokenizer else Path(cfg.data.tokenizer),
                        out / "pipeline")


def finish_lora(objective: Objective, out: Path, held_rows, cfg: TrainConfig, step: int) -> None:
    """Save ``adapter/`` and the held-out flow-matching loss with the adapter disabled (the base)."""
    from .lora import save_adapter

    save_adapter(objective.dit, out / "adapter")
    objective.dit.disable_adapters()
    base = evaluate(objective, held_rows, cfg.eval_rows, cfg.seed)
    objective.dit.enable_adapters()
    _write_eval(out, step, {"base_" + k: v for k, v in base.items()})
    print(f"[colabridge train] base model: " + ", ".join(f"{k}={v:.4f}" for k, v in base.items()))


def export_pipeline(vae: ColaTextVAE, dit: ColaDiT, tokenizer_json: Path, folder: Path) -> Path:
    """Save ``ColaPipeline(vae, dit, FlowMatchEulerDiscreteScheduler, tokenizer)`` in the diffusers layout."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..pipelines import ColaPipeline, load_tokenizer

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    pipe = ColaPipeline(vae.eval(), dit.eval(), scheduler, load_tokenizer(tokenizer_json))
    pipe.save_pretrained(str(folder))
    return folder


def export_checkpoint(cfg: TrainConfig, folder: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                      ema: bool = True) -> Path:
    """Rebuild the run's models, load a checkpoint's weights (default: the latest; its EMA weights if it
    holds them and ``ema``) and save them as ``vae/`` (Stage 1), an adapter (LoRA) or a pipeline
    folder (Stage 2) under ``folder``, while training may go on."""
    from accelerate import Accelerator

    out = Path(cfg.output_dir)
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(out)
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoint_dir(out)}")
    tokenizer, train_rows, _ = prepare_data(cfg.data, out, Accelerator(cpu=True))
    objective = build_objective(cfg, tokenizer.get_vocab_size(), train_rows)
    objective.load_state_dict(load_model_weights(ckpt))
    if ema and has_ema(ckpt):
        load_ema_into(objective, ckpt)
    folder = Path(folder)
    if cfg.stage == "lora":
        from .lora import save_adapter

        return save_adapter(objective.dit, folder)
    if objective.dit is None:
        objective.vae.save_pretrained(folder / "vae")
        return folder
    tok = Path(cfg.data.tokenizer) if cfg.data.tokenizer else out / "tokenizer.json"
    return export_pipeline(objective.vae, objective.dit, tok, folder)

