"""Image adapters on the Cola DiT with random-init tiny SD-style and Flux-style diffusers AutoencoderKLs."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from colabridge import ColaDiT
from colabridge.adapters import (
    LATENT_SPACES, ImageLatentSpace, MultimodalPrior, add_image_adapter, flow_matching_loss_image,
    latent_space_from_config, load_image_adapter, pad_tokens, register_latent_space, save_image_adapter,
)
from colabridge.adapters.losses import image_to_text_velocity, text_to_image_velocity
from colabridge.data.shapes import make_examples
from colabridge.sampling.engine import CachedStream, guided_velocity, packed_guided_velocity, transport_block
from colabridge.sampling.solvers import get_solver
from colabridge.training.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

torch.set_num_threads(1)

IMAGE_SIZE = 32
CAPTION_TOKENS = 8  # two DiT blocks of 4
# style: (latent channels, extra AutoencoderKL config, patch size) — both /8 (4 levels)
STYLES = {
    "sd": (4, {}, 1),  # 4×4×4 latents → 16 tokens of 4
    "flux": (16, {"use_quant_conv": False, "use_post_quant_conv": False, "scaling_factor": 0.3611,
                  "shift_factor": 0.1159}, 2),  # 16×4×4 latents → 4 tokens of 64
}


def tiny_autoencoder(style: str) -> AutoencoderKL:
    channels, extra, _ = STYLES[style]
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=channels, norm_num_groups=4, sample_size=IMAGE_SIZE, **extra,
    ).eval()


def tiny_dit(seed: int = 0) -> ColaDiT:
    torch.manual_seed(seed)
    dit = ColaDiT(txt_in_channels=8, txt_out_channels=8, txt_dim=32, emb_dim=32, heads=2, head_dim=16,
                  num_layers=2, rope_dim=8, block_size=4)
    with torch.no_grad():  # leave adaLN-Zero so outputs are non-trivial
        for p in dit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return dit.eval()


def space_of(style: str, vae=None) -> ImageLatentSpace:
    return ImageLatentSpace.from_autoencoder(vae or tiny_autoencoder(style), patch_size=STYLES[style][2])


def make_prior(style: str, vae=None, randomize: bool = True):
    """Tiny DiT + image adapter; ``randomize`` makes the (zero-init) LoRA B and out-projection non-zero."""
    dit = tiny_dit()
    adapter = add_image_adapter(dit, space_of(style, vae), r=4)
    if randomize:
        with torch.no_grad():
            for name, p in dit.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
            adapter.proj_out.weight.normal_(0, 0.2)
    return MultimodalPrior(dit, {"image": adapter})


def shapes_batch(style: str, vae, n: int = 2):
    """(caption latents (B, T, 8), image tokens (B, N, d)) from rendered shapes-world images."""
    images = np.stack([e.image for e in make_examples(n, seed=0)])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, 32, 32) in [-1, 1]
    with torch.no_grad():
        tokens = space_of(style, vae).encode(vae, pixels)
    captions = torch.randn(n, CAPTION_TOKENS, 8, generator=torch.Generator().manual_seed(1))
    return captions, tokens


def sample_image_tokens(prior: MultimodalPrior, captions: torch.Tensor, steps: int = 3, packed: bool = False):
    """Transport one image block from noise, conditioned on a caption history in a KV cache."""
    bsz, device = captions.shape[0], captions.device
    view = prior.for_modality("image")
    stream = CachedStream(view, prior.transformer.new_cache(), bsz, device)
    stream.prefill(captions, torch.ones(captions.shape[:2], dtype=torch.bool), torch.zeros(captions.shape[:2]),
                   modality="text")
    adapter = prior.adapters["image"]
    noise = torch.randn(bsz, adapter.num_tokens, adapter.token_dim, generator=torch.Generator().manual_seed(2))
    scale = torch.full((bsz,), 3.0)
    velocity = (packed_guided_velocity(view, stream, scale, adapter.num_tokens) if packed
                else guided_velocity(view, stream, scale))
    solver = get_solver("euler")
    with torch.no_grad():
        return transport_block(velocity, noise, solver.make_scheduler(), solver.schedule(steps))


# --------------------------------------------------------------------------- latent spaces


@pytest.mark.parametrize("style", STYLES)
def test_latent_space_reads_the_autoencoder_config(style):
    vae = tiny_autoencoder(style)
    channels, extra, patch = STYLES[style]
    space = space_of(style, vae)
    assert (space.channels, space.downsample, space.sample_size, space.patch_size) == (channels, 8, IMAGE_SIZE, patch)
    assert space.scaling_factor == pytest.approx(vae.config.scaling_factor)
    assert space.shift_factor == pytest.approx(extra.get("shift_factor", 0.0))
    assert space.latent_shape == (channels, 4, 4)
    assert (space.num_tokens, space.token_dim) == ((4 // patch) ** 2, channels * patch * patch)
    latents = torch.randn(2, *space.latent_shape)
    tokens = space.patchify(latents)
    assert tokens.shape == (2, space.num_tokens, space.token_dim)
    assert torch.equal(space.unpatchify(tokens), latents)
    # token 0 is the top-left p×p patch, channel-major
    assert torch.equal(tokens[0, 0], latents[0, :, :patch, :patch].reshape(-1))


def test_latent_space_registry():
    space = space_of("flux")
    assert LATENT_SPACES["image"] is ImageLatentSpace
    assert latent_space_from_config(space.to_config()) == space
    with pytest.raises(ValueError, match="unknown latent space kind 'video'.*'image'"):
        latent_space_from_config({"kind": "video"})
    with pytest.raises(ValueError, match="already registered"):
        register_latent_space("image")(type("Other", (), {}))
    try:
        register_latent_space("toy")(type("Toy", (), {"__init__": lambda self, width: None}))
        assert latent_space_from_config({"kind": "toy", "width": 3}).kind == "toy"
    finally:
        LATENT_SPACES.pop("toy", None)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("style", STYLES)
def test_adapter_trains_and_only_adapter_parameters_change(style):
    vae = tiny_autoencoder(style)
    prior = make_prior(style, vae, randomize=False)
    captions, tokens = shapes_batch(style, vae)
    before = {n: p.detach().clone() for n, p in prior.named_parameters()}
    trainable = [p for p in prior.parameters() if p.requires_grad]
    trainable_names = {n for n, p in prior.named_parameters() if p.requires_grad}
    assert trainable_names == {n for n in before if "lora_" in n or n.startswith("adapters.image.")}
    optimizer = torch.optim.Adam(trainable, lr=3e-2)
    losses = []
    for _ in range(6):  # the same t and noise every step: a fixed batch
        gen = torch.Generator().manual_seed(0)
        loss = sum(flow_matching_loss_image(prior, captions, tokens, d, generator=gen)[0]
                   for d in ("text_to_image", "image_to_text"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses
    changed = {n for n, p in prior.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable_names
    assert any("lora_" in n for n in changed) and "adapters.image.proj_out.weight" in changed


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("style", STYLES)
def test_samples_an_image_block_and_decodes(style):
    vae = tiny_autoencoder(style)
    prior = make_prior(style, vae)
    captions = torch.randn(2, CAPTION_TOKENS, 8, generator=torch.Generator().manual_seed(1))
    tokens = sample_image_tokens(prior, captions)
    adapter = prior.adapters["image"]
    assert tokens.shape == (2, adapter.num_tokens, adapter.token_dim) and torch.isfinite(tokens).all()
    with torch.no_grad():
        images = adapter.space.decode(vae, tokens)
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(images).all()
    # the caption conditions the image; packed CFG (one forward per step) agrees with looped CFG
    assert not torch.allclose(tokens, sample_image_tokens(prior, captions.flip(0)))
    torch.testing.assert_close(sample_image_tokens(prior, captions, packed=True), tokens, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_one_pass_text_to_image_equals_cached_history(style):
    prior = make_prior(style)
    adapter = prior.adapters["image"]
    g = torch.Generator().manual_seed(3)
    captions = torch.randn(2, CAPTION_TOKENS, 8, generator=g)
    zt = torch.randn(2, adapter.num_tokens, adapter.token_dim, generator=g)
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        one_pass = text_to_image_velocity(prior, captions, zt, t, torch.ones(2, CAPTION_TOKENS, dtype=torch.bool))
        stream = CachedStream(prior.for_modality("image"), prior.transformer.new_cache(), 2, captions.device)
        stream.prefill(captions, torch.ones(2, CAPTION_TOKENS, dtype=torch.bool), torch.zeros(2, CAPTION_TOKENS),
                       modality="text")
        cached = stream.query(zt, t[:, None].expand(2, adapter.num_tokens)).sample
        # the image block is bidirectional: its last token changes its first token's velocity
        poked = zt.clone()
        poked[:, -1] += 1.0
        other = text_to_image_velocity(prior, captions, poked, t, torch.ones(2, CAPTION_TOKENS, dtype=torch.bool))
    torch.testing.assert_close(one_pass, cached, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(other[:, 0], one_pass[:, 0])


@pytest.mark.parametrize("style", STYLES)
def test_one_pass_image_to_text_equals_cached_history(style):
    prior = make_prior(style)
    adapter = prior.adapters["image"]
    g = torch.Generator().manual_seed(4)
    image = torch.randn(2, adapter.num_tokens, adapter.token_dim, generator=g)
    text, zt = torch.randn(2, CAPTION_TOKENS, 8, generator=g), torch.randn(2, CAPTION_TOKENS, 8, generator=g)
    t, valid, bs = torch.tensor([200.0, 700.0]), torch.ones(2, CAPTION_TOKENS, dtype=torch.bool), 4
    with torch.no_grad():
        one_pass = image_to_text_velocity(prior, image, text, zt, t, valid)
        stream = CachedStream(prior.for_modality("text"), prior.transformer.new_cache(), 2, text.device)
        stream.prefill(image, torch.ones(2, adapter.num_tokens, dtype=torch.bool),
                       torch.zeros(2, adapter.num_tokens), modality="image")
        for b in range(0, CAPTION_TOKENS, bs):  # each noisy block after [image | earlier clean blocks]
            cached = stream.query(zt[:, b: b + bs], t[:, None].expand(2, bs)).sample
            torch.testing.assert_close(one_pass[:, b: b + bs], cached, atol=1e-5, rtol=1e-5)
            stream.query(text[:, b: b + bs], torch.zeros(2, bs), commit=True)


# --------------------------------------------------------------------------- adapter properties


def test_disabling_the_adapter_restores_base_text_outputs():
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 8, 8, generator=g), torch.rand(2, 8, generator=g) * 1000
    with torch.no_grad():
        base = tiny_dit()(x, t).sample
        prior = make_prior("sd")
        adapted = prior(x, t, modality="text").sample
        prior.transformer.disable_adapters()
        disabled = prior(x, t, modality="text").sample
        prior.transformer.enable_adapters()
    assert not torch.allclose(adapted, base)
    assert torch.equal(disabled, base)


def test_composed_trunk_equals_the_dit_forward():
    """Text tokens routed through MultimodalPrior's own composition match ColaDiT.forward (guards drift)."""
    prior = make_prior("flux")
    g = torch.Generator().manual_seed(6)
    x, t = torch.randn(2, 8, 8, generator=g), torch.rand(2, 8, generator=g) * 1000
    with torch.no_grad():
        composed = prior(pad_tokens(x, prior.width), t, modality=torch.zeros(2, 8, dtype=torch.long)).sample
        direct = prior.transformer(x, t).sample
    assert composed.shape == (2, 8, prior.width)
    torch.testing.assert_close(composed[..., :8], direct, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("style", STYLES)
def test_save_load_round_trip(style, tmp_path):
    vae = tiny_autoencoder(style)
    prior = make_prior(style, vae)
    captions = torch.randn(2, CAPTION_TOKENS, 8, generator=torch.Generator().manual_seed(1))
    expected = sample_image_tokens(prior, captions)
    folder = save_image_adapter(prior.transformer, prior.adapters["image"], tmp_path / "image-adapter")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "projections/config.json",
                 "projections/diffusion_pytorch_model.safetensors"):
        assert (folder / name).is_file(), name
    dit = tiny_dit()
    adapter = load_image_adapter(dit, folder, space=space_of(style, vae))
    loaded = MultimodalPrior(dit, {"image": adapter})
    assert torch.equal(sample_image_tokens(loaded, captions), expected)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_load_rejects_adapters_of_another_base_model(tmp_path):
    from safetensors.torch import load_file, save_file

    prior = make_prior("sd")
    folder = save_image_adapter(prior.transformer, prior.adapters["image"], tmp_path / "sd")
    wide = ColaDiT(txt_in_channels=8, txt_out_channels=8, txt_dim=64, emb_dim=64, heads=2, head_dim=32,
                   num_layers=2, rope_dim=8, block_size=4)
    with pytest.raises(ValueError, match="txt_dim=32.*txt_dim=64"):
        load_image_adapter(wide, folder)
    weights = load_file(str(folder / ADAPTER_WEIGHTS))
    save_file({f"other.{k}": v for k, v in weights.items()}, str(folder / ADAPTER_WEIGHTS))
    dit = tiny_dit()
    with pytest.raises(ValueError, match="none of the .* adapter keys match"):
        load_image_adapter(dit, folder)
    assert not getattr(dit, "peft_config", {})  # nothing half-loaded is left behind


# --------------------------------------------------------------------------- bad input


def test_adapter_for_one_latent_space_rejects_another(tmp_path):
    sd_vae, flux_vae = tiny_autoencoder("sd"), tiny_autoencoder("flux")
    prior = make_prior("sd", sd_vae)
    sd_space = prior.adapters["image"].space
    images = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(ValueError, match=r"\(4, 4, 4\).*\(16, 4, 4\)"):
        sd_space.encode(flux_vae, images)
    with pytest.raises(ValueError, match=r"\(4, 4, 4\).*\(16, 4, 4\)"):
        sd_space.decode(flux_vae, torch.zeros(1, 16, 4))
    with pytest.raises(ValueError, match=r"\(4, 4, 4\).*\(16, 4, 4\)"):
        sd_space.check_compatible(space_of("flux", flux_vae))
    folder = save_image_adapter(prior.transformer, prior.adapters["image"], tmp_path / "sd")
    with pytest.raises(ValueError, match=r"\(4, 4, 4\).*\(16, 4, 4\)"):
        load_image_adapter(tiny_dit(), folder, space=space_of("flux", flux_vae))
    with pytest.raises(ValueError, match="image tokens must have 4 channels"):
        prior(torch.zeros(1, 4, 64), torch.zeros(1, 4), modality="image")


def test_bad_arguments_raise():
    prior = make_prior("sd")
    captions, image = torch.zeros(1, CAPTION_TOKENS, 8), torch.zeros(1, 16, 4)
    with pytest.raises(ValueError, match="direction"):
        flow_matching_loss_image(prior, captions, image, "image_to_video")
    with pytest.raises(ValueError, match="multiple of the DiT block_size=4"):
        flow_matching_loss_image(prior, captions[:, :6], image)
    with pytest.raises(ValueError, match=r"expects \(16, 4\)"):
        flow_matching_loss_image(prior, captions, torch.zeros(1, 4, 64))
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        prior.for_modality("video")
    one_token = ImageLatentSpace(channels=16, downsample=8, sample_size=IMAGE_SIZE, patch_size=4)  # 1 token
    with pytest.raises(ValueError, match="not a multiple of the DiT block_size=4"):
        MultimodalPrior(tiny_dit(), {"image": add_image_adapter(tiny_dit(), one_token)})
    with pytest.raises(ValueError, match="patch_size=3 must divide"):
        ImageLatentSpace(channels=4, downsample=8, sample_size=IMAGE_SIZE, patch_size=3)
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 32, 32\)"):
        space_of("sd").encode(tiny_autoencoder("sd"), torch.zeros(1, 3, 64, 64))
