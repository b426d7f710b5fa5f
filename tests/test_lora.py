"""LoRA on the DiT: PEFT property tests (merge, isolation, disable, save/load)."""

import pytest
import torch

from colabridge import ColaDiT
from colabridge.training.losses import FlowMatchingConfig, flow_matching_loss
from colabridge.training.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, add_lora, load_adapter, lora_config, lora_parameters, save_adapter


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    dit = ColaDiT(txt_in_channels=8, txt_out_channels=8, txt_dim=32, emb_dim=32, heads=2, head_dim=16,
                  num_layers=2, rope_dim=8, block_size=4)
    with torch.no_grad():  # leave adaLN-Zero so outputs are non-trivial
        for p in dit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return dit.eval()


def with_random_lora(dit):
    add_lora(dit, lora_config(r=4))
    with torch.no_grad():  # B starts at zero; make the adapter do something
        for p in lora_parameters(dit).values():
            p.normal_(0, 0.2)
    return dit


def run(dit):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 8, 8, generator=g), torch.rand(2, 8, generator=g) * 1000
    with torch.no_grad():
        return dit(x, t).sample


def test_targets_only_block_linears():
    dit = tiny_dit()
    add_lora(dit, lora_config(r=4))
    names = {n.split(".lora_")[0] for n in lora_parameters(dit)}
    assert names == {f"blocks.{i}.{m}" for i in range(2) for m in ("msa.proj_qkv", "msa.proj_out", "mlp.proj_in", "mlp.proj_out")}


def test_fresh_adapter_is_identity_and_disable_restores_base():
    base = run(tiny_dit())
    dit = tiny_dit()
    add_lora(dit, lora_config(r=4))
    torch.testing.assert_close(run(dit), base)  # B = 0 at init
    with_lora = with_random_lora(tiny_dit())
    assert not torch.allclose(run(with_lora), base)
    with_lora.disable_adapters()
    torch.testing.assert_close(run(with_lora), base)
    with_lora.enable_adapters()
    assert not torch.allclose(run(with_lora), base)


def test_merged_equals_unmerged():
    dit = with_random_lora(tiny_dit())
    unmerged = run(dit)
    dit.fuse_lora()
    torch.testing.assert_close(run(dit), unmerged, atol=1e-5, rtol=1e-5)
    dit.unfuse_lora()
    torch.testing.assert_close(run(dit), unmerged, atol=1e-5, rtol=1e-5)


def test_training_touches_only_adapter_weights():
    dit = tiny_dit().train()
    params = add_lora(dit, lora_config(r=4))
    before = {n: p.detach().clone() for n, p in dit.named_parameters()}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    z0 = torch.randn(2, 8, 8)
    for _ in range(3):
        loss, _ = flow_matching_loss(dit, z0, cfg=FlowMatchingConfig())
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in dit.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_save_load_round_trip(tmp_path):
    dit = with_random_lora(tiny_dit())
    expected = run(dit)
    save_adapter(dit, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    fresh = tiny_dit()
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(run(fresh), expected)
    assert not any(p.requires_grad for p in fresh.parameters())


def test_load_raises_when_no_key_matches(tmp_path):
    dit = with_random_lora(tiny_dit())
    save_adapter(dit, tmp_path / "adapter")
    other = ColaDiT(txt_in_channels=8, txt_out_channels=8, txt_dim=32, emb_dim=32, heads=2, head_dim=16,
                    num_layers=1, rope_dim=8, block_size=4)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    save_file({k.replace("blocks.", "layers."): v for k, v in state.items()}, str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    with pytest.raises(ValueError, match="none of the"):
        load_adapter(other, tmp_path / "adapter")
