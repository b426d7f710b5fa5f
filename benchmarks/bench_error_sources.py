"""Where does generated text lose to real text: in the decoder or in the prior?

Two measurements on held-out sentences of the training corpus:

1. **Decoder.** Continuations of each sentence's first block are generated with one pass per
   block (the official sampler). For every generated latent it reports the decoder's top probability
   and the distance to the VAE re-encoding of the decoded token, beside the two scales of the latent
   space: how far a posterior *sample* lies from the posterior mode (the noise the decoder was
   trained on) and how far the nearest latent of a *different* token lies. Latents that decode with
   high confidence and sit near their re-encoding are readable words: errors then come from the prior.
2. **Prior.** From a true history of ``--history`` tokens, the next block is pure noise (t = 1) or
   noised to t; the DiT's one-step clean estimate ``ẑ0 = z_t − t·v̂`` is decoded and its greedy token
   compared with the true one, with the history and without it (the CFG *uncond* branch), per
   position in the block. Beside it, the AR baseline's top-1 accuracy and mean probability of the
   true token at the same positions.

    python benchmarks/bench_error_sources.py [--pipeline pipelines/cola-tiny-en] [--rows 512]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from colabridge.eval.ar_baseline import heldout_sentences, load_ar_model
from colabridge.sampling.engine import clean_estimate
from colabridge.training.losses import two_l_velocity


@torch.no_grad()
def decoder_readability(pipe, prompts: list[list[int]], max_new_tokens: int) -> dict:
    """Decoder confidence and re-encoding distance of one-pass generated latents (up to the first
    end-of-text, decoded and re-encoded after the prompt as in the pipeline), and the latent scales.
    ``prompts`` are whole blocks of equal length."""
    vae, eos = pipe.vae, pipe.tokenizer.eos_token_id
    out = pipe(prompt_ids=prompts, max_new_tokens=max_new_tokens, sub_block_size=pipe.block_size, drop_finished=False)
    prompt = torch.tensor(prompts)
    n = prompt.shape[1]
    posterior = vae.encode(prompt)
    context = vae.normalize(posterior.mode())  # (B, n, C): the prompt latents the decoder sees
    probs = vae.decode(torch.cat((context, out.latents), 1))[:, n:].softmax(-1).max(-1).values  # (B, L)
    reencoded = vae.normalize(vae.encode(torch.cat((prompt, out.block_ids), 1)).mode())[:, n:]
    dist = (reencoded - out.latents).norm(dim=-1)
    keep = ((out.block_ids == eos).cumsum(1) - (out.block_ids == eos).long()) == 0  # up to the first eos
    sample = vae.normalize(posterior.sample())
    flat, tok = context.flatten(0, 1), prompt.flatten()
    other = torch.cdist(flat, flat).masked_fill(tok[:, None] == tok[None, :], float("inf")).min(1).values
    return {"confidence": float(probs[keep].mean()), "confident_0.9": float((probs[keep] > 0.9).float().mean()),
            "reencode_distance_median": float(dist[keep].median()),
            "posterior_noise_median": float((sample - context).norm(dim=-1).median()),
            "other_token_distance_median": float(other.median())}


@torch.no_grad()
def prior_accuracy(pipe, rows: torch.Tensor, history: int, t: float, seed: int = 0) -> tuple[list[float], list[float]]:
    """Greedy-decoded one-step clean estimate of the block after ``history`` tokens at noise level ``t``:
    per-position accuracy with the true history and with none."""
    vae, dit, bs = pipe.vae, pipe.transformer, pipe.block_size
    z0 = vae.normalize(vae.encode(rows).mode())  # (N, history + bs, C)
    noise = torch.randn(z0[:, history:].shape, generator=torch.Generator().manual_seed(seed))
    zt = z0.clone()
    zt[:, history:] = (1 - t) * z0[:, history:] + t * noise
    steps = torch.zeros(rows.shape)
    steps[:, history:] = t * 1000
    accs = []
    for drop in (None, steps > 0):
        x0 = clean_estimate(zt, steps, two_l_velocity(dit, z0, zt, steps, bs, history_drop=drop))[:, history:]
        tokens = vae.decode(torch.cat((z0[:, :history], x0), 1))[:, history:].argmax(-1)
        accs.append([float(v) for v in (tokens == rows[:, history:]).float().mean(0)])
    return accs[0], accs[1]


@torch.no_grad()
def ar_accuracy(ar, rows: torch.Tensor, history: int, eos_id: int) -> tuple[list[float], list[float]]:
    """AR baseline's per-position top-1 accuracy and mean probability of the true next tokens."""
    ids = torch.cat((torch.full((rows.shape[0], 1), eos_id), rows), 1)
    probs = ar(ids).logits[:, history:-1].softmax(-1)  # predicts rows[:, history:]
    target = rows[:, history:]
    top1 = (probs.argmax(-1) == target).float().mean(0)
    p_true = probs.gather(-1, target[..., None]).squeeze(-1).mean(0)
    return [float(v) for v in top1], [float(v) for v in p_true]


def percents(values: list[float]) -> str:
    return " / ".join(f"{100 * v:.1f}%" for v in values)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default="pipelines/cola-tiny-en")
    p.add_argument("--ar", default="pipelines/ar-baseline-tiny-en")
    p.add_argument("--source", default="wordnet")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--history", type=int, default=8, help="true history in tokens (a multiple of the block size)")
    p.add_argument("--noise-levels", default="1.0,0.85,0.7,0.5")
    p.add_argument("--no-decoder", action="store_true", help="skip measurement 1 (the generation)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from colabridge import ColaPipeline

    pipe = ColaPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    if args.history % pipe.block_size:
        raise SystemExit(f"--history {args.history} must be a multiple of the block size {pipe.block_size}.")
    _, sentences = heldout_sentences(Path(args.pipeline) / "tokenizer" / "tokenizer.json", args.source)
    width = args.history + pipe.block_size
    rows = torch.tensor([s[:width] for s in sentences if len(s) >= width][: args.rows])
    prompts = [s[: pipe.block_size] for s in sentences if len(s) > pipe.block_size][: args.rows]

    result = {"prior": {}}
    if not args.no_decoder:
        d = result["decoder"] = decoder_readability(pipe, prompts, 32)
        print(f"Decoder on {len(prompts)} one-pass continuations: mean top probability {d['confidence']:.3f}, "
              f"{100 * d['confident_0.9']:.1f}% above 0.9; distance to the re-encoding (median) {d['reencode_distance_median']:.2f}, "
              f"against posterior noise {d['posterior_noise_median']:.2f} and the nearest other token {d['other_token_distance_median']:.2f}")
    print(f"\nNext block of {len(rows)} held-out sentences after {args.history} true tokens, greedy token of the decoded "
          "one-step clean estimate (per position in the block)\n\n| predictor | accuracy |\n|---|---|")
    for t in (float(x) for x in args.noise_levels.split(",")):
        with_h, without = prior_accuracy(pipe, rows, args.history, t)
        result["prior"][t] = {"history": with_h, "no_history": without}
        print(f"| Cola prior, t = {t:g}, true history | {percents(with_h)} |\n| Cola prior, t = {t:g}, no history | {percents(without)} |")
    top1, p_true = ar_accuracy(load_ar_model(args.ar), rows, args.history, pipe.tokenizer.eos_token_id)
    result["ar"] = {"top1": top1, "p_true": p_true}
    print(f"| AR baseline, top-1 | {percents(top1)} |\n| AR baseline, mean p(true token) | {percents(p_true)} |")
    return result


if __name__ == "__main__":
    main()
