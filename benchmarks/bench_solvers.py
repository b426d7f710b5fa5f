"""Few-step solvers against a many-step Euler reference on the fixture model.

Prints, per solver and step count: DiT forwards per block, RMS and max |Δ| of the final latents against
a 64-step Euler reference, and the fraction of tokens equal to the 16-step Euler tokens. Quality on a
trained model (generative perplexity) is measured by `colabridge eval` once one exists.

    python benchmarks/bench_solvers.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from colabridge import ColaPipeline
from colabridge.sampling.solvers import get_solver

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "cola-official-tiny"
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Rain", "The farmer wakes up early to feed the cows",
           "Question: What is the capital of France? Answer:"]


def run(pipe, **kw):
    return pipe(PROMPTS, max_new_tokens=16, noise_seed=66, stop_token_ids=[], prior_input_rounding=None, **kw)


def main() -> None:
    torch.set_num_threads(1)
    pipe = ColaPipeline.from_pretrained(FIXTURE)
    pipe.set_progress_bar_config(disable=True)
    reference = run(pipe, num_inference_steps=64)
    euler16 = run(pipe, num_inference_steps=16)
    print("| solver | steps | DiT forwards/block | RMS Δ vs Euler-64 | max Δ | tokens = Euler-16 |")
    print("|---|---|---|---|---|---|")
    for solver, steps in [("euler", 4), ("euler", 6), ("euler", 8), ("euler", 16), ("heun", 3), ("heun", 4), ("heun", 6), ("heun", 8)]:
        out = run(pipe, num_inference_steps=steps, solver=solver)
        diff = out.latents - reference.latents
        same = (out.block_ids == euler16.block_ids).float().mean().item()
        calls = get_solver(solver).model_calls(steps)
        print(f"| {solver} | {steps} | {calls} | {diff.pow(2).mean().sqrt():.4f} | {diff.abs().max():.4f} | {100 * same:.0f}% |")


if __name__ == "__main__":
    main()
