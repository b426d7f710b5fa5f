"""How well does the Cola prior predict the next block of real text, beside the AR baseline?

Generative perplexity mixes the prior's quality with error build-up over many generated blocks. This
benchmark isolates the prior: each held-out sentence with at least ``prompt_len + block`` tokens gives a
*true* history (its first ``--prompt-len`` tokens, a whole number of blocks) and a *true* next block.
Both models **sample** that one block from the true history, ``--draws`` times with different seeds:

* Cola: the pipeline with one block of new tokens (16 Euler steps, greedy decoding, each CFG scale of
  ``--guidance``);
* AR baseline: ``block`` tokens drawn one by one at temperature 1 with no top-k/top-p filter, i.e. from
  the model's own distribution (for the first token the hit rate estimates ``E[p(true token)]``).

Printed: per position in the block, the fraction of samples equal to the true token, and the fraction
of exact block matches. A prior as good as the AR model has the same hit rates at guidance 1.

    python benchmarks/bench_prior_vs_ar.py [--pipeline pipelines/cola-tiny-en] [--rows 512] [--draws 4]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from colabridge.eval.ar_baseline import heldout_sentences, load_ar_model


def hit_rates(samples: torch.Tensor, truth: torch.Tensor) -> dict:
    """``samples`` ``(D, N, bs)`` against ``truth`` ``(N, bs)``: per-position and exact-block hit rates."""
    hits = samples == truth
    return {"per_position": [round(float(v), 4) for v in hits.float().mean((0, 1))], "exact_block": float(hits.all(-1).float().mean())}


@torch.no_grad()
def ar_block_samples(ar, histories: list[list[int]], block: int, eos_id: int, draws: int) -> torch.Tensor:
    """``(draws, N, block)`` continuations drawn from the AR model's full distribution (temperature 1)."""
    ids = torch.tensor([[eos_id] + h for h in histories])  # histories have equal length: no padding
    out = []
    for d in range(draws):
        torch.manual_seed(d)
        gen = ar.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                          temperature=1.0, max_new_tokens=block, pad_token_id=eos_id)
        new = gen[:, ids.shape[1]:]  # shorter than ``block`` only if every row ended: pad with eos
        out.append(torch.nn.functional.pad(new, (0, block - new.shape[1]), value=eos_id))
    return torch.stack(out)


def cola_block_samples(pipe, histories: list[list[int]], guidance: float, draws: int) -> torch.Tensor:
    """``(draws, N, bs)`` next blocks sampled by the Cola pipeline (official per-sample noise seeds)."""
    bs = pipe.block_size
    out = []
    for d in range(draws):
        seqs = pipe(prompt_ids=histories, max_new_tokens=bs, guidance_scale=guidance, noise_seed=d * 7919,
                    drop_finished=False, output_type="ids").sequences
        out.append(torch.tensor([list(s[:bs]) for s in seqs]))
    return torch.stack(out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default="pipelines/cola-tiny-en")
    p.add_argument("--ar", default="pipelines/ar-baseline-tiny-en")
    p.add_argument("--source", default="wordnet")
    p.add_argument("--prompt-len", type=int, default=8, help="true history length in tokens (a multiple of the block size)")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--guidance", default="1,3,7")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from colabridge import ColaPipeline

    pipe = ColaPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    bs, eos_id = pipe.block_size, pipe.tokenizer.eos_token_id
    if args.prompt_len % bs:
        raise SystemExit(f"--prompt-len {args.prompt_len} must be a multiple of the block size {bs}.")
    ar = load_ar_model(args.ar)
    _, sentences = heldout_sentences(Path(args.pipeline) / "tokenizer" / "tokenizer.json", args.source)
    rows = [s for s in sentences if len(s) >= args.prompt_len + bs][: args.rows]
    histories = [r[: args.prompt_len] for r in rows]
    truth = torch.tensor([r[args.prompt_len : args.prompt_len + bs] for r in rows])
    print(f"{len(rows)} held-out sentences, true history {args.prompt_len} tokens, next block {bs} tokens, {args.draws} draws")

    result = {"AR baseline (temperature 1)": hit_rates(ar_block_samples(ar, histories, bs, eos_id, args.draws), truth)}
    for g in (float(x) for x in args.guidance.split(",")):
        result[f"Cola, CFG {g:g}"] = hit_rates(cola_block_samples(pipe, histories, g, args.draws), truth)
    print("\n| sampler | hit rate per position | exact block |\n|---|---|---|")
    for name, r in result.items():
        print(f"| {name} | {' / '.join(f'{100 * v:.1f}%' for v in r['per_position'])} | {100 * r['exact_block']:.2f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "result": result}, indent=2))
    return result


if __name__ == "__main__":
    main()
