"""Generated-text quality of a Cola text pipeline against held-out real text (issue 4 targets).

Prompts are the first 3–4 tokens (``--min-prompt-len``…``--prompt-len``, not cutting a word) of held-out sentences (the trainer's hash split of the
same corpus); the model continues each for up to ``--max-new-tokens`` tokens with the default sampler
settings (greedy token choice, CFG 7, official per-sample noise seeds). The real reference is each
sentence's own continuation (rest + ``<|endoftext|>``). For each of real text, 16-step Euler, 6-step
Euler and 6-step Heun it prints: generative perplexity under the AR baseline (tokens after the first
end-of-text dropped, the end-of-text itself scored), unigram entropy, distinct-1/2, 4-gram repetition
rate and mean length (statistics over content tokens, end-of-text excluded; unigram entropy also at a
common token count, since the plug-in estimate grows with corpus size) — plus, for the small-scale
Cola-vs-AR comparison, the AR baseline's own top-p samples — then the issue's ratios:

* gen-ppl ≤ 1.5 × real text's (with a 95% paired bootstrap interval over prompts);
* unigram entropy within 10 % of real text's;
* the best 6-step solver's gen-ppl within 5 % of 16-step Euler's (Heun with 6 steps = 11 DiT calls/block).

    python benchmarks/bench_text_quality.py [--pipeline pipelines/cola-tiny-en] [--ar pipelines/ar-baseline-tiny-en]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from colabridge.eval.ar_baseline import (
    compare_perplexity,
    continuation_nlls,
    heldout_sentences,
    load_ar_model,
    pooled_perplexity,
    prompt_continuations,
    word_start_ids,
)
from colabridge.eval.metrics import text_stats, unigram_entropy

CONFIGS = [("euler", 16), ("euler", 6), ("heun", 6)]


def cut(ids, eos_id: int) -> list[int]:
    ids = list(ids)
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


def content(ids, eos_id: int) -> list[int]:
    return [i for i in cut(ids, eos_id) if i != eos_id]


def matched_entropy(seqs, n_tokens: int, draws: int = 20, seed: int = 0) -> float:
    """Unigram entropy of ``n_tokens`` tokens drawn without replacement from the pooled ``seqs``, averaged
    over ``draws`` draws: the plug-in entropy grows with corpus size, so corpora of different total
    length (generated text is often shorter) are compared at the same size."""
    import random

    pool = [t for s in seqs for t in s]
    if n_tokens >= len(pool):
        return unigram_entropy([pool])
    rng = random.Random(seed)
    return sum(unigram_entropy([rng.sample(pool, n_tokens)]) for _ in range(draws)) / draws


contents: list[list[list[int]]] = []  # content tokens of each row, in row order
nlls: dict[str, list[tuple[float, int]]] = {}  # per-prompt (NLL, scored tokens) of each row, by row name


def row_stats(name: str, ar, prompts, conts, eos_id: int, extra: dict | None = None) -> dict:
    conts = [cut(c, eos_id) for c in conts]
    body = [content(c, eos_id) for c in conts]
    contents.append(body)
    stats = text_stats(body)
    nlls[name] = continuation_nlls(ar, conts, prompts, eos_id=eos_id)
    row = {"name": name, "gen_ppl": pooled_perplexity(nlls[name]), **stats,
           "ended": sum(eos_id in c for c in conts) / len(conts), "tokens": sum(len(b) for b in body)}
    row.update(extra or {})
    return row


def load_against(path: str) -> dict:
    """The per-prompt NLLs stored in another run's ``--json`` (checked before any generation runs)."""
    try:
        stored = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"--against {path}: cannot read it as JSON ({err}); pass a file written by --json.")
    if "nlls" not in stored:
        raise SystemExit(f"--against {path}: it holds no per-prompt NLLs (written by an older version of this "
                         "script); rerun the other pipeline with --json to compare against it.")
    return stored["nlls"]


def against(path: str, other: dict, real_name: str) -> dict:
    """Paired gen-ppl ratio (with its 95% interval) of each config to the same config in another run's --json."""
    if [n for _, n in other[real_name]] != [n for _, n in nlls[real_name]]:
        raise SystemExit(f"--against {path}: its held-out prompts differ from this run's; use the same "
                         f"--num-prompts/--prompt-len/--min-prompt-len/--source.")
    print(f"\nPaired against {path} (same prompts):")
    out = {}
    for name, mine in nlls.items():
        if name == real_name or name not in other:
            continue
        out[name] = compare_perplexity(mine, other[name])
        lo, hi = out[name]["gen_ppl_ratio_ci95"]
        print(f"  {name}: gen-ppl {out[name]['gen_ppl_ratio']:.3f}× the other's [95% CI {lo:.3f}–{hi:.3f}]")
    return out


@torch.no_grad()
def ar_samples(ar, prompts, max_new_tokens: int, eos_id: int, seed: int, top_k: int = 50, top_p: float = 0.9):
    """Continuations sampled from the AR baseline itself (``[eos] + prompt`` as context), for the
    Cola-vs-AR comparison of text statistics (its gen-ppl is self-scored, hence optimistic)."""
    torch.manual_seed(seed)
    out = []
    for pr in prompts:
        ids = torch.tensor([[eos_id] + list(pr)])
        gen = ar.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=top_k, top_p=top_p,
                          max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=eos_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default="pipelines/cola-tiny-en")
    p.add_argument("--ar", default="pipelines/ar-baseline-tiny-en")
    p.add_argument("--source", default="wordnet", help="corpus the held-out split is taken from")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=4)
    p.add_argument("--min-prompt-len", type=int, default=3, help="shorten the prompt to this so it does not cut a word")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--noise-seed", type=int, default=0)
    p.add_argument("--configs", default=",".join(f"{s}:{n}" for s, n in CONFIGS), help="solver:steps[:guidance],... (default guidance: the pipeline's)")
    p.add_argument("--clamp-below", type=float, default=None, help="pipeline clamp_below (Diffusion-LM clamping) for the Euler configs")
    p.add_argument("--sub-block-size", type=int, default=None, help="pipeline sub_block_size (sequential sub-blocks) for every config")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-ar-samples", action="store_true", help="skip the AR baseline's own samples")
    p.add_argument("--json", default=None, help="also write the rows, ratios and per-prompt NLLs here")
    p.add_argument("--against", default=None, help="a --json file of another pipeline on the same prompts: print "
                                                    "each config's paired gen-ppl ratio to the same config there")
    p.add_argument("--show", type=int, default=3, help="print this many sample continuations per config")
    args = p.parse_args(argv)
    other_nlls = load_against(args.against) if args.against else None
    torch.set_num_threads(args.threads)

    from colabridge import ColaPipeline

    pipe = ColaPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    ar = load_ar_model(args.ar)
    tok_file = Path(args.pipeline) / "tokenizer" / "tokenizer.json"
    eos_id = pipe.tokenizer.eos_token_id
    if ar.config.vocab_size != len(pipe.tokenizer) or ar.config.eos_token_id != eos_id:
        raise SystemExit(f"AR baseline vocab/eos ({ar.config.vocab_size}, {ar.config.eos_token_id}) do not match the "
                         f"pipeline tokenizer's ({len(pipe.tokenizer)}, {eos_id}).")
    texts, sentences = heldout_sentences(tok_file, args.source)
    prompts, real = prompt_continuations(sentences, args.prompt_len, args.max_new_tokens, eos_id, limit=args.num_prompts,
                                         min_prompt_len=args.min_prompt_len, word_start_ids=word_start_ids(pipe.tokenizer))
    print(f"{len(prompts)} held-out prompts of {args.min_prompt_len}–{args.prompt_len} tokens (word boundary), {args.max_new_tokens} new tokens max; "
          f"pipeline {args.pipeline}, AR baseline {args.ar}")

    rows = [row_stats("held-out real text", ar, prompts, real, eos_id)]
    samples = {}
    for spec in args.configs.split(","):
        solver, steps, *guidance = spec.split(":")
        kw = {"guidance_scale": float(guidance[0])} if guidance else {}
        clamp = {} if args.clamp_below is None or solver != "euler" else {"clamp_below": args.clamp_below}  # Euler only
        if args.sub_block_size is not None:
            kw["sub_block_size"] = args.sub_block_size
        t0 = time.time()
        out = pipe(prompt_ids=prompts, max_new_tokens=args.max_new_tokens, num_inference_steps=int(steps),
                   solver=solver, noise_seed=args.noise_seed, output_type="ids", **kw, **clamp)
        wall = time.time() - t0
        name = f"{solver} {steps} steps" + (f" (CFG {kw['guidance_scale']:g})" if "guidance_scale" in kw else "")
        name += f" (clamp σ ≤ {args.clamp_below:g})" if clamp else ""
        name += f" (sub-blocks of {args.sub_block_size})" if args.sub_block_size is not None else ""
        rows.append(row_stats(name, ar, prompts, out.sequences, eos_id, {"wall_s": wall}))
        samples[name] = [pipe.tokenizer.decode(pr + cut(s, eos_id)) for pr, s in zip(prompts[: args.show], out.sequences)]
        print(f"  {name}: {wall:.1f} s", flush=True)

    if not args.no_ar_samples:
        t0 = time.time()
        conts = ar_samples(ar, prompts, args.max_new_tokens, eos_id, args.noise_seed)
        name = "AR baseline samples (top-k 50, top-p 0.9; self-scored)"
        rows.append(row_stats(name, ar, prompts, conts, eos_id, {"wall_s": time.time() - t0}))
        samples[name] = [pipe.tokenizer.decode(pr + cut(c, eos_id)) for pr, c in zip(prompts[: args.show], conts)]

    # size-matched unigram entropy: every row at the smallest row's token count
    n_match = min(r["tokens"] for r in rows)
    for r, c in zip(rows, contents):
        r["entropy_matched"] = matched_entropy(c, n_match)

    print(f"\n| text | gen-ppl (AR) | unigram entropy | entropy @{n_match} tok | distinct-1 | distinct-2 | repetition-4 | "
          "mean length | ended | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        wall = f"{r['wall_s']:.0f}" if "wall_s" in r else "–"
        print(f"| {r['name']} | {r['gen_ppl']:.2f} | {r['unigram_entropy']:.3f} | {r['entropy_matched']:.3f} | {r['distinct_1']:.3f} | "
              f"{r['distinct_2']:.3f} | {r['repetition_4']:.3f} | {r['mean_length']:.1f} | {100 * r['ended']:.0f}% | {wall} |")

    real_row, gen = rows[0], {r["name"]: r for r in rows[1:] if not r["name"].startswith("AR ")}
    print("\nTargets (issue 4):")
    ratios = {}
    for name, r in gen.items():
        ent_dev = r["unigram_entropy"] / real_row["unigram_entropy"] - 1
        ent_match = r["entropy_matched"] / real_row["entropy_matched"] - 1
        ratios[name] = {**compare_perplexity(nlls[name], nlls[real_row["name"]]), "entropy_rel_diff": ent_dev,
                        "entropy_matched_rel_diff": ent_match}
        ppl_ratio, (lo, hi) = ratios[name]["gen_ppl_ratio"], ratios[name]["gen_ppl_ratio_ci95"]
        print(f"  {name}: gen-ppl / real = {ppl_ratio:.2f} [95% CI {lo:.2f}–{hi:.2f}] "
              f"({'PASS' if ppl_ratio <= 1.5 else 'FAIL'} ≤ 1.5); "
              f"entropy vs real = {100 * ent_dev:+.1f}% ({'PASS' if abs(ent_dev) <= 0.10 else 'FAIL'} within ±10%), "
              f"size-matched {100 * ent_match:+.1f}% ({'PASS' if abs(ent_match) <= 0.10 else 'FAIL'})")
    ref = next((r for n, r in gen.items() if n.startswith("euler 16 ")), None)
    six = [r for n, r in gen.items() if n.endswith(" 6 steps")]
    if ref and six:
        best = min(six, key=lambda r: r["gen_ppl"])
        rel = best["gen_ppl"] / ref["gen_ppl"] - 1
        ratios["best_6_step"] = {"name": best["name"], "rel_to_euler16": rel}
        print(f"  best 6-step ({best['name']}): gen-ppl {best['gen_ppl']:.2f} vs Euler-16 {ref['gen_ppl']:.2f} = "
              f"{100 * rel:+.1f}% ({'PASS' if rel <= 0.05 else 'FAIL'} ≤ +5%)")
    if args.against:
        ratios["against"] = against(args.against, other_nlls, real_row["name"])
    print("\nSamples (prompt + continuation):")
    for name, texts_ in samples.items():
        for t in texts_:
            print(f"  [{name}] {t!r}")
    result = {"rows": rows, "ratios": ratios, "samples": samples, "args": vars(args), "nlls": nlls}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
