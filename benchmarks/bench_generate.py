"""Generation speed of ColaPipeline (and optionally the official implementation) on random models.

Reports generated tokens/s, DiT forwards per generated token, peak resident memory, and the fraction
of the FLOP-limited rate (this CPU's measured fp32 matmul peak / nominal model FLOPs per token).
Every cell runs in a fresh subprocess so memory and thread settings do not leak between cells.

    python benchmarks/bench_generate.py                         # colabridge only, full table
    python benchmarks/bench_generate.py --official-path DIR     # DIR holds an official `cola_dlm`
                                                                # package (not installed by this script)

Settings: 64 new tokens, 16 steps, CFG 7, greedy, no stop ids, CPU float32, median of --repeats calls.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TOKENIZER = HERE.parent / "tests" / "fixtures" / "cola-official-tiny" / "tokenizer.json"
CONFIGS = {
    "tiny": dict(
        vae=dict(vocab_size=484, encoder_num_blocks=2, decoder_num_blocks=2, dim=64, ffn_dim=256, latent_dim=8,
                 num_heads=4, block_size=4),
        dit=dict(txt_in_channels=8, txt_out_channels=8, txt_dim=64, emb_dim=64, heads=4, head_dim=16,
                 num_layers=2, rope_dim=12, block_size=4),
    ),
    "mid": dict(
        vae=dict(vocab_size=484, encoder_num_blocks=2, decoder_num_blocks=2, dim=512, ffn_dim=2048, latent_dim=16,
                 num_heads=8, block_size=4),
        dit=dict(txt_in_channels=16, txt_out_channels=16, txt_dim=512, emb_dim=512, heads=8, head_dim=64,
                 num_layers=8, rope_dim=48, block_size=4),
    ),
}
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is the capital of France? Answer:",
    "Rain",
    "The farmer wakes up early to feed the cows and chickens, and then he",
    "Once upon a time there was a small village by the sea",
    "In 1905, the physicist published four papers that",
    "The recipe calls for two cups of flour and",
    "She opened the door and saw",
]


def build_checkpoint(name: str, folder: Path) -> Path:
    """Random official-layout checkpoint (seeded; every parameter perturbed so AdaLN is non-zero)."""
    from colabridge.checkpoints import save_official
    from colabridge.models import ColaDiT, ColaTextVAE

    out = folder / name
    if (out / "cola_dlm" / "cola_dit" / "model.safetensors").is_file():
        return out
    torch.manual_seed(0)
    for cls, key, sub in ((ColaTextVAE, "vae", "cola_vae"), (ColaDiT, "dit", "cola_dit")):
        model = cls(**CONFIGS[name][key])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p) if p.ndim == 1 else 0.25 * p.std() * torch.randn_like(p))
        save_official(model, out / "cola_dlm" / sub)
    (out / "tokenizer.json").write_bytes(TOKENIZER.read_bytes())
    return out


def run_colabridge(ckpt: Path, batch: int, new_tokens: int):
    from colabridge import ColaPipeline

    pipe = ColaPipeline.from_pretrained(ckpt)
    pipe.set_progress_bar_config(disable=True)
    calls = {"n": 0}
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))

    def generate():
        out = pipe(PROMPTS[:batch], max_new_tokens=new_tokens, stop_token_ids=[], noise_seed=66)
        return out.texts

    return generate, calls


def run_official(ckpt: Path, batch: int, new_tokens: int, official_path: str):
    """The official generate, run unchanged in its CPU fp32 mode (spec §7.1: upcast bf16 DiT inputs)."""
    import os

    sys.path.insert(0, official_path)
    from cola_dlm import inference, modeling_cola_dit
    from cola_dlm.modeling_cola_dit import ColaDiTModel
    from cola_dlm.modeling_cola_vae import ColaTextVAEModel
    from tokenizers import Tokenizer

    modeling_cola_dit.set_attn_backend("sdpa")
    os.environ["COLA_INFER_PER_SAMPLE_NOISE_SEED"] = "66"
    dit = ColaDiTModel.from_pretrained(ckpt / "cola_dlm" / "cola_dit", dtype=torch.float32).eval()
    vae = ColaTextVAEModel.from_pretrained(ckpt / "cola_dlm" / "cola_vae", dtype=torch.float32).eval()
    calls = {"n": 0}

    def upcast(module, args, kwargs):
        calls["n"] += 1
        return args, {k: v.float() if torch.is_tensor(v) and v.dtype == torch.bfloat16 else v for k, v in kwargs.items()}

    dit.register_forward_pre_hook(upcast, with_kwargs=True)
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    prompts = [{"id": i, "question": p} for i, p in enumerate(PROMPTS[:batch])]

    def generate():
        res = inference.generate_task_repaint_inference(
            dit=dit, vae=vae, tokenizer=tok, prompts=prompts, device=torch.device("cpu"),
            max_new_tokens=new_tokens, pad_token_id=483)
        return [r["generate"] for r in res]

    return generate, calls


def run_cell(args) -> dict:
    torch.set_num_threads(args.threads)
    ckpt = build_checkpoint(args.config, Path(args.cache))
    if args.impl == "official":
        generate, calls = run_official(ckpt, args.batch, args.new_tokens, args.official_path)
    else:
        generate, calls = run_colabridge(ckpt, args.batch, args.new_tokens)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    generate()  # warm-up
    times = []
    for _ in range(args.repeats):
        calls["n"] = 0
        start = time.perf_counter()
        seqs = generate()
        times.append(time.perf_counter() - start)
    tokens = generated_tokens(ckpt, args.batch, args.new_tokens)
    return dict(impl=args.impl, config=args.config, batch=args.batch, threads=args.threads,
                tokens_per_s=tokens / statistics.median(times), dit_forwards_per_token=calls["n"] / tokens * args.batch,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                rss_growth_mib=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024,
                texts=seqs)


def generated_tokens(ckpt: Path, batch: int, new_tokens: int) -> int:
    """Tokens the official algorithm returns: whole blocks minus the re-decoded prompt tokens of block 0."""
    from tokenizers import Tokenizer

    bs = json.loads((ckpt / "cola_dlm" / "cola_dit" / "config.json").read_text())["block_size"]
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    n_blocks = -(-new_tokens // bs)
    return sum(n_blocks * bs - len(tok.encode(p).ids) % bs for p in PROMPTS[:batch])


def matmul_peak_gflops(threads: int, n: int = 1024, reps: int = 20) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def nominal_flops_per_token(config: str, steps: int = 16) -> float:
    """Official algorithm: (2·steps + 1) DiT token-forwards + 1 decoder token-forward, 2 FLOPs per weight."""
    from colabridge.models import ColaDiT, ColaTextVAE

    dit, vae = ColaDiT(**CONFIGS[config]["dit"]), ColaTextVAE(**CONFIGS[config]["vae"])
    linear = lambda mods: sum(m.weight.numel() for m in mods if isinstance(m, torch.nn.Linear))  # noqa: E731
    return 2 * ((2 * steps + 1) * linear(dit.modules()) + linear(vae.decoder.modules()))


def table(args) -> None:
    rows, cells = [], [(c, b, t) for c in ("tiny", "mid") for b in (1, 8) for t in (1, 2)]
    impls = ["colabridge"] + (["official"] if args.official_path else [])
    peaks = {t: matmul_peak_gflops(t) for t in (1, 2)}
    for config, batch, threads in cells:
        for impl in impls:
            cmd = [sys.executable, __file__, "--cell", "--impl", impl, "--config", config, "--batch", str(batch),
                   "--threads", str(threads), "--repeats", str(args.repeats), "--cache", args.cache,
                   "--new-tokens", str(args.new_tokens)] + (["--official-path", args.official_path] if args.official_path else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            row = json.loads(out)
            row["flop_limited_tokens_per_s"] = peaks[threads] * 1e9 / nominal_flops_per_token(config)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    print(f"matmul peak fp32: {peaks[1]:.0f} GFLOP/s (1 thread), {peaks[2]:.0f} GFLOP/s (2 threads)\n")
    print("| config | batch | threads | impl | tokens/s | DiT fwd/token | peak RSS MiB | % of FLOP-limited | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next((o for o in rows if o["impl"] == "official" and (o["config"], o["batch"], o["threads"]) == (r["config"], r["batch"], r["threads"])), None)
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}×" if ref and r["impl"] != "official" else ""
        same = "" if not ref or r["impl"] == "official" else (" (same text)" if ref["texts"] == r["texts"] else " (TEXT DIFFERS)")
        print(f"| {r['config']} | {r['batch']} | {r['threads']} | {r['impl']} | {r['tokens_per_s']:.1f} | "
              f"{r['dit_forwards_per_token']:.2f} | {r['peak_rss_mib']:.0f} | "
              f"{100 * r['tokens_per_s'] / r['flop_limited_tokens_per_s']:.0f}% | {ratio}{same} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", action="store_true", help="run one cell and print its JSON (internal)")
    parser.add_argument("--impl", default="colabridge", choices=("colabridge", "official"))
    parser.add_argument("--config", default="tiny", choices=tuple(CONFIGS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per cell (median reported)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--cache", default=str(HERE / ".cache"), help="where random checkpoints are written")
    parser.add_argument("--official-path", default=None, help="folder containing the official `cola_dlm` package")
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(run_cell(args)))
    else:
        table(args)


if __name__ == "__main__":
    main()
