"""AR baseline: generative perplexity on a tiny random GPT-2 (fast)."""

import math

import pytest
import torch
import torch.nn.functional as F

from colabridge.eval.ar_baseline import (
    build_ar_model,
    continuation_nll,
    continuation_nlls,
    perplexity_ratio_interval,
    generative_perplexity,
    pack_rows,
    prompt_continuations,
    real_text_perplexity,
)

V, EOS, PAD = 32, 0, 3


@pytest.fixture()
def tiny():
    torch.set_num_threads(1)
    return build_ar_model(V, EOS, PAD, n_embd=32, n_layer=2, n_head=2, n_positions=32, seed=0).eval()


def test_finite(tiny):
    gen = [[5, 6, 7, 8], [9, 10, EOS, 11, 12], [4]]
    ppl = generative_perplexity(tiny, gen, contexts=[[1, 2], [1], []])
    assert math.isfinite(ppl) and ppl > 1


def test_matches_hand_computed_cross_entropy(tiny):
    contexts = [[7, 8], [9]]
    gens = [[10, 11, EOS, 12, 13], [14, 15, 16]]  # tokens after the first eos are dropped
    nlls = []
    with torch.no_grad():
        for ctx, gen in zip(contexts, gens):
            kept = gen[: gen.index(EOS) + 1] if EOS in gen else gen
            full = torch.tensor([[EOS] + ctx + kept])  # bos = eos
            logits = tiny(input_ids=full).logits[0]
            n = len(kept)
            nlls.append(F.cross_entropy(logits[-n - 1 : -1], full[0, -n:], reduction="none"))
    expected = math.exp(torch.cat(nlls).mean().item())
    assert generative_perplexity(tiny, gens, contexts) == pytest.approx(expected, rel=1e-5)
    total, count = continuation_nll(tiny, gens, contexts)
    assert count == 3 + 3
    # no bos, no context: the first token is not scored
    t2, c2 = continuation_nll(tiny, [[5, 6, 7]], bos_id=-1)
    assert c2 == 2
    # per continuation, in input order; an empty one scores nothing and keeps its place
    per = continuation_nlls(tiny, [gens[0], [], gens[1]], [contexts[0], [3], contexts[1]], batch_size=2)
    assert [n for _, n in per] == [3, 0, 3]
    for (value, _), expect in zip(per[::2], nlls):
        assert value == pytest.approx(expect.sum().item(), rel=1e-5)
    assert total == pytest.approx(sum(v for v, _ in per), rel=1e-6)


def test_training_on_repeated_sequence_lowers_its_perplexity(tiny):
    torch.manual_seed(0)
    seq = [5, 9, 13, 17, 21, 25, 29, 6, 10, 14]
    other = torch.randint(4, V, (10,), generator=torch.Generator().manual_seed(1)).tolist()
    before = generative_perplexity(tiny, [seq], [[4]])
    model = tiny.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([[EOS, 4] + seq] * 4)
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    after = generative_perplexity(model, [seq], [[4]])
    assert after < before
    assert after < generative_perplexity(model, [other], [[4]])


def test_prompt_continuations_and_real_text(tiny):
    sents = [[5, 6, 7, 8, 9, 10, 11, 12], [5, 6], [7, 8, 9, 10, 11, 12, 13, 14, 15]]
    prompts, conts = prompt_continuations(sents, prompt_len=4, max_new_tokens=3, eos_id=EOS)
    assert prompts == [[5, 6, 7, 8], [7, 8, 9, 10]]
    assert conts == [[9, 10, 11], [11, 12, 13]]
    assert math.isfinite(real_text_perplexity(tiny, sents, prompt_len=4))


def test_pack_rows():  # the batch order is the trainer's BatchPlan, tested in test_trainer.py
    ids, labels = pack_rows([[5, 6], [7, 8, 9]], seq_len=5, eos_id=EOS, pad_id=PAD)
    assert ids.tolist() == [[EOS, 5, 6, EOS, PAD], [EOS, 7, 8, 9, EOS]]
    assert labels[0].tolist() == [EOS, 5, 6, EOS, -100]


def test_prompts_stop_at_word_boundaries():
    # token 7 continues a word; 8 starts one: a 4-token prompt would cut before 7, so 3 tokens are used
    sents = [[5, 6, 8, 9, 7, 8, 9, 8, 9], [5, 6, 9, 7, 7, 7, 7, 7, 7]]
    prompts, conts = prompt_continuations(sents, prompt_len=4, eos_id=EOS, min_prompt_len=3, word_start_ids={5, 6, 8, 9})
    assert prompts[0] == [5, 6, 8]
    assert prompts[1] == [5, 6, 9, 7]  # no boundary within 3..4: falls back to prompt_len
    assert conts[0] == [9, 7, 8, 9, 8, 9, EOS]


# --------------------------------------------------------------------------- training script

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "the old house stood on the hill",
             "birds sing in the morning", "she reads a book by the fire", "rain fell on the quiet town"] * 6


def _ar_config(tmp_path, run):
    from colabridge.data.text import train_tokenizer
    from colabridge.eval.ar_baseline import ARTrainConfig

    (tmp_path / "sentences.txt").write_text("\n".join(SENTENCES) + "\n")
    train_tokenizer(SENTENCES, vocab_size=300, min_frequency=1).save(str(tmp_path / "tokenizer.json"))
    return ARTrainConfig(tokenizer=str(tmp_path / "tokenizer.json"), source=str(tmp_path / "sentences.txt"),
                         holdout_fraction=0.2, seq_len=16, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                         batch_size=2, max_steps=4, warmup_steps=2, save_every=1, log_every=1, eval_rows=4,
                         output=str(tmp_path / run / "out"), run_dir=str(tmp_path / run / "run"), save_dtype="float32")


def test_training_resumes_exactly(tmp_path, crash_after_checkpoint):
    """4 steps in one go == 2 steps, a crash right after checkpoint-2, then a resume: same losses, same weights."""
    from safetensors.torch import load_file

    from colabridge.eval import ar_baseline as A

    full = A.train_ar_baseline(_ar_config(tmp_path, "full"))
    restore = crash_after_checkpoint(A, 2)
    with pytest.raises(Exception, match="simulated kill"):
        A.train_ar_baseline(_ar_config(tmp_path, "split"))
    restore()
    split = A.train_ar_baseline(_ar_config(tmp_path, "split"))

    def losses(run):  # step, loss, lr (elapsed time differs)
        return [line.split(",")[:3] for line in (tmp_path / run / "run" / "losses.csv").read_text().splitlines()]

    assert losses("split") == losses("full") and len(losses("full")) == 5
    assert split["heldout_loss"] == full["heldout_loss"] and split["steps"] == full["steps"] == 4
    a, b = (load_file(str(tmp_path / run / "out" / "model.safetensors")) for run in ("full", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in (tmp_path / "full" / "run" / "checkpoints").iterdir()] == ["checkpoint-4"]
    assert (tmp_path / "full" / "run" / "losses.png").is_file()


def test_perplexity_ratio_interval_brackets_the_ratio_and_narrows_with_more_prompts():
    g = torch.Generator().manual_seed(0)

    def nlls(n, mean):  # 10 tokens per continuation, per-token NLL around `mean`
        return [(10 * (mean + 0.5 * float(torch.randn(1, generator=g))), 10) for _ in range(n)]

    small, small_ref = nlls(16, 3.0), nlls(16, 2.0)
    big, big_ref = nlls(1024, 3.0), nlls(1024, 2.0)
    point = math.exp(sum(v for v, _ in big) / 10240 - sum(v for v, _ in big_ref) / 10240)
    lo, hi = perplexity_ratio_interval(big, big_ref)
    assert lo < point < hi and lo < math.e < hi
    lo_s, hi_s = perplexity_ratio_interval(small, small_ref)
    assert hi_s - lo_s > 2 * (hi - lo)
    with pytest.raises(ValueError, match="same prompts"):
        perplexity_ratio_interval(small, big_ref)
