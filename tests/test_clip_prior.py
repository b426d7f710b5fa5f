"""Text → CLIP image-embedding prior on tiny random models: open_clip space, adapter, pipeline, shipped artifacts."""

import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from colabridge.adapters import (
    ClipEmbeddingSpace, MultimodalPrior, add_image_adapter, flow_matching_loss_image, latent_space_from_config,
    load_image_adapter, save_image_adapter,
)
from colabridge.data.shapes import make_examples
from colabridge.eval.retrieval import clip_prior_retrieval, recall_at_k
from colabridge.models.clip import TOKENIZER_FOLDER, ClipCaptionTokenizer, ColaClipEmbedder, load_clip
from colabridge.pipelines import ColaClipPriorPipeline, ColaPipeline
from colabridge.pipelines.pipeline_clip_prior import IMAGE_EMBEDS

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CAPTION_TOKENIZER = REPO / "pipelines" / "shapes-text" / "tokenizer"
SHIPPED = (REPO / "pipelines" / "shapes-text", REPO / "adapters" / "shapes-clip-prior", REPO / "pipelines" / "shapes-clip")
EMBED_DIM = 16
NUM_TOKENS = 4  # one DiT block of 4 tokens × 4 channels
STEPS = 2


def tiny_clip(embed_dim: int = EMBED_DIM, seed: int = 0) -> ColaClipEmbedder:
    """A random-init tiny open_clip CLIP (1-layer towers, 32 px, patch 8) over the shapes caption tokenizer."""
    tok = ClipCaptionTokenizer(CAPTION_TOKENIZER, context_length=16)
    torch.manual_seed(seed)
    return ColaClipEmbedder(
        embed_dim=embed_dim, vision_cfg={"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        text_cfg={"context_length": 16, "vocab_size": tok.vocab_size, "width": 32, "heads": 2, "layers": 1,
                  "pad_id": tok.pad_token_id, "eos_id": tok.eos_token_id, "pool_type": "eos"},
    ).eval()


def images(n: int = 2) -> np.ndarray:
    return np.stack([e.image for e in make_examples(n, seed=0)])  # (n, 32, 32, 3) uint8


def randomize(transformer, adapter) -> None:
    """LoRA B and the out-projection start at zero; make them non-zero so outputs depend on them."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        adapter.proj_out.weight.copy_(0.2 * torch.randn(adapter.proj_out.weight.shape, generator=g))


@pytest.fixture(scope="module")
def parts(fixture_dir, tmp_path_factory):
    """(text pipeline folder, adapter folder, CLIP folder) of tiny random models."""
    root = tmp_path_factory.mktemp("clip-parts")
    text = ColaPipeline.from_pretrained(fixture_dir)
    text.save_pretrained(root / "text")
    clip = tiny_clip()
    clip.save_pretrained(root / "clip")
    ClipCaptionTokenizer(CAPTION_TOKENIZER, 16).save_pretrained(root / "clip" / TOKENIZER_FOLDER)
    with torch.no_grad():
        space = ClipEmbeddingSpace.from_embeddings(clip.embed_images(images(8)), NUM_TOKENS)
    adapter = add_image_adapter(text.transformer, space, r=4, adapter_name=IMAGE_EMBEDS)
    randomize(text.transformer, adapter)
    save_image_adapter(text.transformer, adapter, root / "adapter", adapter_name=IMAGE_EMBEDS)
    return root / "text", root / "adapter", root / "clip"


@pytest.fixture(scope="module")
def pipe(parts):
    pipe = ColaClipPriorPipeline.from_parts(*parts, fuse=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- space, CLIP, metrics


def test_clip_space_registered_round_trips_and_standardises():
    embeds = torch.nn.functional.normalize(torch.randn(64, EMBED_DIM) + 2.0, dim=-1)
    space = ClipEmbeddingSpace.from_embeddings(embeds, NUM_TOKENS)
    rebuilt = latent_space_from_config(space.to_config())
    assert rebuilt == space and rebuilt.kind == "open_clip"
    tokens = space.tokens_from_embeds(embeds)  # (64, 4, 4)
    assert tokens.shape == (64, NUM_TOKENS, EMBED_DIM // NUM_TOKENS)
    flat = space.unpatchify(tokens)
    torch.testing.assert_close(flat.mean(0), torch.zeros(EMBED_DIM), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(0), torch.ones(EMBED_DIM), atol=1e-4, rtol=0)
    torch.testing.assert_close(space.embeds_from_tokens(tokens), embeds, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="must divide embed_dim"):
        ClipEmbeddingSpace(embed_dim=10, num_tokens=4)


def test_clip_embedder_is_open_clip_and_saves_as_safetensors(tmp_path):
    import open_clip

    clip = tiny_clip()
    assert isinstance(clip.model, open_clip.CLIP)
    clip.save_pretrained(tmp_path)
    ClipCaptionTokenizer(CAPTION_TOKENIZER, 16).save_pretrained(tmp_path / TOKENIZER_FOLDER)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded, tok = load_clip(tmp_path)
    ids = tok(["a small red circle on the left.", "a big blue square " * 10])  # the second is truncated
    assert ids.shape == (2, 16) and (ids == tok.eos_token_id).any(1).all()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(ids), clip.encode_text(ids))
        torch.testing.assert_close(loaded.embed_images(images()), clip.embed_images(images()))
    with pytest.raises(ValueError, match="32×32"):
        clip.preprocess(torch.zeros(1, 3, 16, 16))


def test_recall_at_k_counts_ranks_against_a_hand_table():
    keys = torch.eye(4)
    queries = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, 0.1, 0.9, 0], [0, 0, 0, 1]])  # query 1 ranks 2nd
    out = recall_at_k(queries, keys, ks=(1, 2))
    assert out["R@1"] == pytest.approx(0.75) and out["R@2"] == pytest.approx(1.0)
    assert out["chance@1"] == pytest.approx(0.25) and out["chance@2"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- adapter training


def test_adapter_flow_matching_loss_decreases_and_trains_only_adapter_parameters(fixture_dir):
    text = ColaPipeline.from_pretrained(fixture_dir)
    clip = tiny_clip()
    with torch.no_grad():
        embeds = clip.embed_images(images(4))
    space = ClipEmbeddingSpace.from_embeddings(embeds, NUM_TOKENS)
    adapter = add_image_adapter(text.transformer, space, r=4, adapter_name=IMAGE_EMBEDS)
    prior = MultimodalPrior(text.transformer, {IMAGE_EMBEDS: adapter})
    frozen = {n: p.detach().clone() for n, p in text.transformer.named_parameters() if "lora_" not in n}
    captions = torch.randn(4, 8, text.transformer.config.txt_in_channels, generator=torch.Generator().manual_seed(1))
    tokens = space.tokens_from_embeds(embeds)
    params = [p for p in prior.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(8):
        loss, _ = flow_matching_loss_image(prior, captions, tokens, modality=IMAGE_EMBEDS, drop_condition_prob=0.1,
                                           generator=torch.Generator().manual_seed(0))  # fixed batch, noise and t
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in text.transformer.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, frozen[name]), name


def test_disabling_the_adapter_restores_base_text_outputs(fixture_dir):
    text = ColaPipeline.from_pretrained(fixture_dir)
    dit = text.transformer
    x = torch.randn(2, 8, dit.config.txt_in_channels, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        base = dit(x, t).sample
        adapter = add_image_adapter(dit, ClipEmbeddingSpace(EMBED_DIM, NUM_TOKENS), r=4, adapter_name=IMAGE_EMBEDS)
        randomize(dit, adapter)
        prior = MultimodalPrior(dit, {IMAGE_EMBEDS: adapter})
        assert not torch.allclose(prior(x, t).sample, base)
        dit.disable_adapters()
        torch.testing.assert_close(prior(x, t).sample, base)
        dit.enable_adapters()


# --------------------------------------------------------------------------- pipeline


def test_prior_returns_embeds_and_negative_embeds(pipe):
    out = pipe(["a red circle", "a blue square above a green cross"], num_images_per_prompt=3, num_inference_steps=STEPS,
               generator=torch.Generator().manual_seed(0))
    assert out.image_embeds.shape == (6, EMBED_DIM) and out.negative_image_embeds.shape == (6, EMBED_DIM)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(6))
    zero = pipe("a red circle", negative_prompt=None, num_inference_steps=STEPS, output_type="np")
    assert isinstance(zero.image_embeds, np.ndarray)
    torch.testing.assert_close(torch.from_numpy(zero.negative_image_embeds), pipe.zero_image_embeds(1))


def test_negative_is_the_prior_sample_of_the_negative_prompt_in_the_same_batch(pipe):
    noise = torch.randn(2, NUM_TOKENS, EMBED_DIM // NUM_TOKENS, generator=torch.Generator().manual_seed(3))
    both = pipe("a red circle", negative_prompt="a green cross", num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(3))
    prompt = pipe("a red circle", negative_prompt=None, latents=noise[:1], num_inference_steps=STEPS)
    negative = pipe("a green cross", negative_prompt=None, latents=noise[1:], num_inference_steps=STEPS)
    torch.testing.assert_close(both.image_embeds, prompt.image_embeds, atol=1e-4, rtol=0)
    torch.testing.assert_close(both.negative_image_embeds, negative.image_embeds, atol=1e-4, rtol=0)


def test_interpolate_weights_images_and_prompts(pipe):
    image = PIL.Image.fromarray(images(1)[0])
    out = pipe.interpolate([image], [1.0], num_inference_steps=STEPS)
    expected = pipe.image_encoder.embed_images(image)
    torch.testing.assert_close(out.image_embeds, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(1))
    mixed = pipe.interpolate(["a red circle", image, torch.from_numpy(images(1)).permute(0, 3, 1, 2) / 255.0],
                             [0.5, 0.25, 0.25], num_images_per_prompt=2, num_inference_steps=STEPS,
                             generator=torch.Generator().manual_seed(0))
    assert mixed.image_embeds.shape == (2, EMBED_DIM) and mixed.negative_image_embeds.shape == (2, EMBED_DIM)
    torch.testing.assert_close(mixed.negative_image_embeds, pipe.zero_image_embeds(2))
    with pytest.raises(ValueError, match="one weight per condition"):
        pipe.interpolate(["a red circle"], [0.5, 0.5])
    with pytest.raises(TypeError, match="must be str"):
        pipe.interpolate([3], [1.0])


def test_adapter_save_load_round_trip_gives_identical_embeddings(pipe, parts, tmp_path):
    text_dir, _, clip_dir = parts
    save_image_adapter(pipe.transformer, pipe.prior_adapter, tmp_path / "again", adapter_name=IMAGE_EMBEDS)
    again = ColaClipPriorPipeline.from_parts(text_dir, tmp_path / "again", clip_dir, fuse=True)
    again.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=STEPS, negative_prompt=None)
    a = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).image_embeds
    b = again("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).image_embeds
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_fused_pipeline_saves_and_loads_as_a_diffusers_folder(parts, tmp_path):
    import json

    pipe = ColaClipPriorPipeline.from_parts(*parts, fuse=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["image_encoder"] == ["colabridge.models.clip", "ColaClipEmbedder"]
    loaded = ColaClipPriorPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=STEPS, negative_prompt=None)
    a = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).image_embeds
    b = loaded("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).image_embeds
    torch.testing.assert_close(a, b)


def test_adapter_for_another_embedding_dim_raises_naming_both(pipe, parts, fixture_dir):
    other = tiny_clip(embed_dim=2 * EMBED_DIM)
    with pytest.raises(ValueError, match=rf"dim {EMBED_DIM}.*dim {2 * EMBED_DIM}"):
        ColaClipPriorPipeline(**{**pipe.components, "image_encoder": other})
    text = ColaPipeline.from_pretrained(fixture_dir)
    with pytest.raises(ValueError, match=rf"dim {EMBED_DIM}.*dim {2 * EMBED_DIM}"):
        load_image_adapter(text.transformer, parts[1], space=ClipEmbeddingSpace(2 * EMBED_DIM, NUM_TOKENS))


def test_bad_arguments(pipe):
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        pipe("a red circle", num_images_per_prompt=0)
    with pytest.raises(ValueError, match="one per prompt"):
        pipe(["a", "b"], negative_prompt=["c"])
    with pytest.raises(ValueError, match="output_type"):
        pipe("a", output_type="pil")
    with pytest.raises(ValueError, match="latents"):
        pipe("a", latents=torch.zeros(1, 3, 3))


def test_retrieval_benchmark_runs_on_tiny_models(pipe, parts):
    _, tok = load_clip(parts[2])
    out = clip_prior_retrieval(pipe, tok, make_examples(4, seed=0, split="heldout"), num_inference_steps=STEPS)
    assert set(out["prior"]) == {"R@1", "R@5", "chance@1", "chance@5"} and out["prior"]["chance@1"] == 0.25
    assert 0.0 <= out["text_tower"]["R@1"] <= 1.0


def test_cli_clip_prior_writes_embeddings(parts, tmp_path, capsys):
    from safetensors.torch import load_file

    from colabridge.cli import main

    out = tmp_path / "embeds.safetensors"
    main(["clip-prior", "a red circle", "-n", "2", "--steps", str(STEPS), "--model", str(parts[0]),
          "--adapter", str(parts[1]), "--clip", str(parts[2]), "-o", str(out)])
    tensors = load_file(str(out))
    assert tensors["image_embeds"].shape == (2, EMBED_DIM) and tensors["negative_image_embeds"].shape == (2, EMBED_DIM)
    assert "image_embeds (2, 16)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="all of --model"):
        main(["clip-prior", "a red circle", "--model", str(parts[0])])


def test_clip_training_script_runs(tmp_path):
    from colabridge.adapters.train_shapes_clip import main

    main(["--tokenizer", str(CAPTION_TOKENIZER), "--out", str(tmp_path / "run"), "--save", str(tmp_path / "clip"),
          "--steps", "2", "--batch-size", "8", "--width", "32", "--layers", "1", "--embed-dim", "16",
          "--eval-num", "8", "--log-every", "1"])
    assert (tmp_path / "clip" / "metrics.json").is_file() and (tmp_path / "run" / "log.csv").is_file()
    clip, _ = load_clip(tmp_path / "clip")
    assert clip.embed_dim == 16


# --------------------------------------------------------------------------- shipped artifacts


@pytest.mark.skipif(not all(p.is_dir() for p in SHIPPED), reason="shipped shapes-clip artifacts not present")
def test_shipped_clip_prior_loads_offline_and_produces_embeddings(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = ColaClipPriorPipeline.from_parts(*SHIPPED)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a small yellow circle on the left.", "a big red cross at the top."], num_inference_steps=4,
               generator=torch.Generator().manual_seed(0))
    dim = pipe.image_encoder.embed_dim
    assert out.image_embeds.shape == (2, dim) and out.negative_image_embeds.shape == (2, dim)
    assert torch.isfinite(out.image_embeds).all()
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(2))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
