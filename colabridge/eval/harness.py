"""``colabridge eval`` / ``colabridge eval heldout``: held-out metrics of a Cola pipeline on a text corpus.

Reported (one JSON object):

* ``heldout_recon_acc`` / ``heldout_recon_ce`` — VAE token reconstruction from the posterior mode;
* ``heldout_fm`` — the flow-matching loss (2L trick, fixed seed) on normalised posterior-mode latents;
* ``generated`` / ``real`` — :func:`colabridge.eval.metrics.text_stats` of continuations generated
  from the first ``prompt_tokens`` tokens of held-out sentences, beside the same statistics of the
  real continuations (ids up to the first end-of-text);
* with a judge (an autoregressive baseline sharing the tokenizer; by default the embedded
  ``pipelines/ar-baseline-tiny-en`` for the embedded model): ``gen_ppl`` of the generated and of the real
  continuations given their prompts, ``gen_ppl_ratio`` and its 95% paired bootstrap interval over prompts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from . import ar_baseline, metrics

EVAL_ROWS = 256


def heldout_rows(pipe, texts: list[str], seq_len: int):
    """Pack held-out ``texts`` with the pipeline's tokenizer into ``(ids, real)`` rows."""
    from ..data.text import pack_sentences

    tok = pipe.tokenizer
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return pack_sentences(ids, seq_len, tok.eos_token_id, tok.pad_token_id)


@torch.no_grad()
def latent_metrics(pipe, ids: torch.Tensor, real: torch.Tensor, seed: int = 0) -> dict:
    """Reconstruction accuracy / CE and flow-matching loss on packed rows."""
    from ..training import losses as L

    vae, dit = pipe.vae, pipe.transformer
    g = torch.Generator().manual_seed(seed)
    sums = {"heldout_recon_acc": 0.0, "heldout_recon_ce": 0.0, "heldout_fm": 0.0}
    count = 0.0
    for i in range(0, len(ids), 64):
        b_ids, b_real = ids[i : i + 64], real[i : i + 64]
        z = vae.normalize(vae.encode(b_ids).mode())  # the decoder's input space, as in the pipeline
        logits = vae.decode(z)
        n = float(b_real.sum())
        sums["heldout_recon_acc"] += float(L.token_accuracy(logits, b_ids, b_real)) * n
        sums["heldout_recon_ce"] += float(L.token_cross_entropy(logits, b_ids, b_real)) * n
        fm_cfg = L.FlowMatchingConfig(prompt_block_prob=0.0)
        sums["heldout_fm"] += float(L.flow_matching_loss(dit, z, b_real, fm_cfg, generator=g)[0]) * n
        count += n
    return {k: v / count for k, v in sums.items()}


def _until_eos(ids: list[int], stop: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stop:
            return ids[:i]
    return ids


def generation_metrics(pipe, texts: list[str], prompt_tokens: int, max_new_tokens: int, seed: int = 0,
                       judge=None, **call_kwargs) -> dict:
    """Generate from the first ``prompt_tokens`` tokens of each text; compare with the real rest (and score
    both under ``judge``, a causal LM with the pipeline's tokenizer, when given)."""
    tok = pipe.tokenizer
    stop = set(pipe.default_stop_ids())
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    encoded = [ids for ids in encoded if len(ids) > prompt_tokens]
    prompts = [ids[:prompt_tokens] for ids in encoded]
    real = [ids[prompt_tokens:] for ids in encoded]
    out = pipe(prompt_ids=prompts, max_new_tokens=max_new_tokens, generator=torch.Generator().manual_seed(seed),
               output_type="ids", **call_kwargs)
    generated = [_until_eos(seq, stop) for seq in out.sequences]
    result = {"generated": metrics.text_stats(generated), "real": metrics.text_stats(real),
              "samples": tok.batch_decode([p + g for p, g in zip(prompts[:8], generated[:8])])}
    if judge is not None:
        result.update(judge_metrics(judge, prompts, generated, real))
    return result


def judge_metrics(judge, prompts: list[list[int]], generated: list[list[int]], real: list[list[int]]) -> dict:
    """Generative perplexity of ``generated`` and ``real`` continuations of ``prompts`` under ``judge``."""
    gen = ar_baseline.continuation_nlls(judge, generated, prompts)
    ref = ar_baseline.continuation_nlls(judge, real, prompts)
    return {"gen_ppl": ar_baseline.pooled_perplexity(gen), "real_gen_ppl": ar_baseline.pooled_perplexity(ref),
            **ar_baseline.compare_perplexity(gen, ref)}


def evaluate_pipeline(pipe, texts: list[str], seq_len: int = 64, num_prompts: int = 32, prompt_tokens: int = 3,
                      max_new_tokens: int = 32, seed: int = 0, judge=None, **call_kwargs) -> dict:
    """All metrics of :mod:`colabridge.eval.harness` on held-out ``texts`` (``judge``: see :func:`generation_metrics`)."""
    ids, real = heldout_rows(pipe, texts, seq_len)
    result = latent_metrics(pipe, ids[:EVAL_ROWS], real[:EVAL_ROWS], seed)
    result.update(generation_metrics(pipe, texts[:num_prompts], prompt_tokens, max_new_tokens, seed, judge,
                                     **call_kwargs))
    return result


def _add_heldout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="pipeline folder; default: the embedded model")
    p.add_argument("--data", default="wordnet", help="'wordnet' (its 2%% hold-out split) or a text file, one sentence a line")
    p.add_argument("--holdout-fraction", type=float, default=0.02, help="hold-out share used at training time (wordnet)")
    p.add_argument("--num-prompts", type=int, default=32, help="held-out sentences to continue")
    p.add_argument("--prompt-tokens", type=int, default=3, help="prompt length in tokens")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt")
    p.add_argument("--steps", type=int, default=16, help="Euler steps per block")
    p.add_argument("--guidance-scale", type=float, default=7.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="seed of noise and metrics")
    p.add_argument("--judge", default="auto",
                   help="AR baseline folder that scores generated and real text (gen-ppl); 'auto': the embedded "
                        "pipelines/ar-baseline-tiny-en when --model is the embedded default; 'none': skip")
    p.add_argument("--output", help="also write the JSON result here")
    p.set_defaults(func=cmd_eval)


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``colabridge eval [heldout|tasks]`` on a ``colabridge`` argparse ``subparsers`` object.

    A bare ``colabridge eval [options]`` runs ``heldout`` (the held-out metrics), as before the
    sub-commands existed.
    """
    from .tasks_cli import add_tasks_parser

    help_text = "held-out metrics (default, or 'heldout') or the official 8-task benchmark ('tasks')"
    p = subparsers.add_parser("eval", help=help_text, description=help_text)
    _add_heldout_args(p)
    modes = p.add_subparsers(dest="eval_command", metavar="{heldout,tasks}")
    _add_heldout_args(modes.add_parser("heldout", help="held-out reconstruction, flow-matching loss and "
                                                       "generated-text statistics (the default)"))
    add_tasks_parser(modes)
    return p


def cmd_eval(args) -> None:
    from ..data import text
    from ..paths import default_text_model
    from ..pipelines import ColaPipeline

    torch.set_num_threads(1)
    pipe = ColaPipeline.from_pretrained(args.model or default_text_model())
    pipe.set_progress_bar_config(disable=True)
    if args.data == "wordnet":
        _, texts = text.split_holdout(text.read_wordnet(), args.holdout_fraction)
    else:
        texts = text.read_lines(args.data)
    result = evaluate_pipeline(pipe, texts, num_prompts=args.num_prompts, prompt_tokens=args.prompt_tokens,
                               max_new_tokens=args.max_new_tokens, seed=args.seed, judge=_load_judge(args, pipe),
                               num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    dumped = json.dumps(result, indent=2, ensure_ascii=False)
    print(dumped)
    if args.output:
        Path(args.output).write_text(dumped + "\n")


def _load_judge(args, pipe):
    """The ``--judge`` model, checked against the pipeline's tokenizer (None for 'none', or for 'auto' with
    a user's ``--model``, whose tokenizer the embedded judge does not share)."""
    from ..paths import artifact_root

    if args.judge == "none" or (args.judge == "auto" and args.model):
        return None
    folder = artifact_root() / "pipelines" / "ar-baseline-tiny-en" if args.judge == "auto" else Path(args.judge)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--judge {folder}: no model there (config.json missing); pass an AR baseline "
                                f"folder trained with this tokenizer, or --judge none.")
    judge = ar_baseline.load_ar_model(folder)
    if judge.config.vocab_size != len(pipe.tokenizer):
        raise ValueError(f"--judge {folder}: its vocabulary ({judge.config.vocab_size}) is not the pipeline "
                         f"tokenizer's ({len(pipe.tokenizer)}); the judge must share the tokenizer, or pass --judge none.")
    return judge
