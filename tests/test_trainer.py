"""accelerate trainer: two real processes (gloo), and exact resume after SIGKILL."""

import csv
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colabridge.training import trainer as T

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "the old house stood on the hill",
         "birds sing in the morning", "she reads a book by the fire", "rain fell on the quiet town"] * 8


def tiny_config(out, stage="joint", **kw):
    cfg = dict(
        stage=stage, output_dir=str(out), seed=3,
        data=dict(source="texts", texts=TEXTS, vocab_size=300, seq_len=16, holdout_fraction=0.1),
        vae=dict(encoder_num_blocks=1, decoder_num_blocks=1, dim=32, ffn_dim=64, latent_dim=8, num_heads=2, block_size=4),
        dit=dict(txt_dim=32, emb_dim=32, heads=2, head_dim=16, num_layers=1, rope_dim=8),
        batch_size=2, grad_accum=2, max_steps=6, save_every=2, log_every=1, eval_rows=8,
        optim=dict(warmup_steps=2, lr=1e-3),
    )
    cfg.update(kw)
    return T.TrainConfig(**cfg)


def read_losses(out):
    with open(out / "losses.csv", newline="") as fh:
        return {int(r["step"]): r for r in csv.DictReader(fh)}


def _killed_run(cfg):
    """Train, but SIGKILL this process right after step 3 is logged (checkpoint-2 is on disk, the
    CSV already holds a row that the resumed run must replace)."""
    original = T.LossLog.append

    def append_then_die(self, row):
        original(self, row)
        if row["step"] == 3:
            os.kill(os.getpid(), signal.SIGKILL)

    T.LossLog.append = append_then_die
    T.train(cfg)


def test_resume_after_sigkill_reproduces_losses(tmp_path):
    full = tmp_path / "full"
    T.train(tiny_config(full))
    reference = read_losses(full)

    killed = tmp_path / "killed"
    proc = multiprocessing.get_context("fork").Process(target=_killed_run, args=(tiny_config(killed),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    assert T.latest_checkpoint(killed).name == "checkpoint-2"
    assert 3 in read_losses(killed)

    T.train(tiny_config(killed), resume=True)
    resumed = read_losses(killed)
    assert sorted(resumed) == sorted(reference) == list(range(1, 7))
    for step in range(1, 7):
        for key in ("loss", "recon", "fm", "ref_kl", "lr"):
            assert float(resumed[step][key]) == pytest.approx(float(reference[step][key]), rel=1e-6, abs=1e-7), (step, key)
    assert (killed / "pipeline" / "model_index.json").is_file()

    exported = T.export_checkpoint(tiny_config(full), tmp_path / "exported")  # latest = final step
    from safetensors.torch import load_file

    for part in ("vae", "transformer"):
        a = load_file(str(exported / part / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(full / "pipeline" / part / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ddp_worker(out):
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a process that already trained alone

    objective = T.train(tiny_config(out, stage="vae", max_steps=2, grad_accum=1))
    state = PartialState()
    flat = torch.cat([p.detach().flatten() for p in objective.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(state.num_processes)]
    torch.distributed.all_gather(gathered, flat)
    assert state.num_processes == 2
    assert torch.equal(gathered[0], gathered[1]), "DDP replicas diverged"


def test_two_process_ddp(tmp_path):
    # a fresh interpreter: forking workers from a process whose OpenMP pool already ran (earlier tests)
    # can deadlock them
    code = (f"import sys, pathlib; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "from accelerate import debug_launcher; from test_trainer import _ddp_worker; "
            f"debug_launcher(_ddp_worker, args=(pathlib.Path({str(tmp_path)!r}),), num_processes=2)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = T.latest_checkpoint(tmp_path)
    assert ckpt.name == "checkpoint-2"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(ckpt))
    assert (tmp_path / "vae" / "config.json").is_file()
    assert len(read_losses(tmp_path)) == 2


def test_batch_plan_is_a_function_of_the_step():
    a = T.BatchPlan(20, 3, world=2, rank=0, seed=1)
    b = T.BatchPlan(20, 3, world=2, rank=1, seed=1)
    first = [a.indices(m).tolist() for m in range(7)]
    assert first == [T.BatchPlan(20, 3, 2, 0, 1).indices(m).tolist() for m in range(7)]
    for m in range(3):  # one epoch: ranks disjoint
        assert not set(a.indices(m).tolist()) & set(b.indices(m).tolist())
    assert first[3] != first[0]  # epoch 2 is a new permutation


def test_config_validation():
    with pytest.raises(ValueError, match="stage"):
        T.TrainConfig(stage="dpo")
    with pytest.raises(ValueError, match="data.path"):
        T.load_texts(T.DataConfig(source="lines"))


def test_lora_stage_trains_adapter_only(tmp_path):
    from safetensors.torch import load_file

    from colabridge.training.lora import ADAPTER_WEIGHTS

    T.train(tiny_config(tmp_path / "base", max_steps=2, grad_accum=1))
    cfg = tiny_config(tmp_path / "lora", stage="lora", init_pipeline=str(tmp_path / "base" / "pipeline"),
                      lora=dict(r=2), max_steps=3, grad_accum=1)
    objective = T.train(cfg)
    base = load_file(str(tmp_path / "base" / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors"))
    tuned = {k.replace(".base_layer", ""): v for k, v in objective.dit.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], tuned[k]) for k in base)
    assert (tmp_path / "lora" / "adapter" / ADAPTER_WEIGHTS).is_file()
    evals = [json.loads(line) for line in (tmp_path / "lora" / "eval.jsonl").read_text().splitlines()]
    assert "heldout_fm" in evals[-2] and "base_heldout_fm" in evals[-1]


def _safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_ema_weights_resume_exactly_and_are_exported(tmp_path):
    from colabridge.training.ema import EMA_FILE

    ema = {"decay": 0.9}
    full = tmp_path / "full"
    T.train(tiny_config(full, ema=ema, eval_every=3))
    split = tmp_path / "split"
    T.train(tiny_config(split, ema=ema), stop_at_step=2)
    T.train(tiny_config(split, ema=ema), resume=True)

    ckpt = T.latest_checkpoint(full)
    averaged, raw = _safetensors(ckpt / EMA_FILE), _safetensors(ckpt / "model.safetensors")
    assert averaged.keys() <= raw.keys() and not any(k.startswith("ref_vae.") for k in averaged)
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged)  # the average lags the weights
    assert averaged.keys() == _safetensors(T.latest_checkpoint(split) / EMA_FILE).keys()
    for part in ("vae", "transformer"):
        a = _safetensors(full / "pipeline" / part / "diffusion_pytorch_model.safetensors")
        b = _safetensors(split / "pipeline" / part / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), part  # resumed EMA == uninterrupted EMA
    dit = _safetensors(full / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    params = [k for k in dit if "dit." + k in averaged]  # (not the rotary buffers)
    assert len(params) > 10 and all(torch.equal(dit[k], averaged["dit." + k]) for k in params)  # the export holds the EMA
    evals = [json.loads(line) for line in (full / "eval.jsonl").read_text().splitlines()]
    assert {"heldout_fm", "ema_heldout_fm"} <= evals[0].keys() and evals[0]["step"] == 3

    exported = T.export_checkpoint(tiny_config(full, ema=ema), tmp_path / "raw", ema=False)
    dit_raw = _safetensors(exported / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(dit_raw[k], raw["dit." + k]) for k in params)


def test_ema_follows_its_decay():
    from colabridge.training.ema import EMAWeights

    layer = torch.nn.Linear(2, 2)
    start = layer.weight.detach().clone()
    ema = EMAWeights(layer, decay=0.5, min_decay=0.5)  # 0.5 after EMAModel's first step (a copy)
    ema.step()
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.step()
    with ema.applied():
        assert torch.allclose(layer.weight, start + 0.5)
    assert torch.allclose(layer.weight, start + 1.0)  # the trained weights are back


def test_resume_without_ema_state_starts_the_average(tmp_path, capsys):
    T.train(tiny_config(tmp_path, max_steps=4), stop_at_step=2)
    T.train(tiny_config(tmp_path, max_steps=4, ema={"decay": 0.9}), resume=True)
    assert "holds no EMA weights" in capsys.readouterr().out
    assert (T.latest_checkpoint(tmp_path) / "ema.safetensors").is_file()


def test_bad_ema_option_names_the_field():
    with pytest.raises(ValueError, match="ema: unknown option.*'decai'"):
        T.TrainConfig(ema={"decai": 0.9})


def test_token_head_trains_with_the_run_and_stays_out_of_the_export(tmp_path):
    out = tmp_path / "tok"
    T.train(tiny_config(out, max_steps=3, loss=dict(token_weight=0.5, freeze_vae=True)))
    rows = read_losses(out)
    assert all(float(rows[s]["token_ce"]) > 0 for s in rows)
    weights = _safetensors(T.latest_checkpoint(out) / "model.safetensors")
    assert {"token_head.proj.weight", "token_head.norm.weight"} <= weights.keys()
    exported = _safetensors(out / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert not any("token_head" in k for k in exported)
    assert weights["token_head.proj.weight"].shape[1] == 32  # it reads the prior's hidden width
