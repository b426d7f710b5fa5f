"""Text → image and image → caption pipelines on tiny random models (fixture text model + SD-style AutoencoderKL)."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL

from colabridge.adapters import ImageLatentSpace, add_image_adapter, save_image_adapter
from colabridge.pipelines import ColaCaptionPipeline, ColaImagePriorPipeline, ColaPipeline
from colabridge.pipelines.pipeline_image import encode_captions, load_image_pipeline

torch.set_num_threads(1)

IMAGE_SIZE = 32
STEPS = 2


def tiny_autoencoder() -> AutoencoderKL:
    """SD-style (4 channels, /8) random AutoencoderKL: 4×4×4 latents → 16 image tokens of 4."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=IMAGE_SIZE,
    ).eval()


def randomize_adapter(transformer, adapter) -> None:
    """LoRA B and the out-projection start at zero; make them non-zero so outputs depend on them."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        adapter.proj_out.weight.copy_(0.2 * torch.randn(adapter.proj_out.weight.shape, generator=g))


@pytest.fixture(scope="module")
def parts(fixture_dir, tmp_path_factory):
    """(text pipeline folder, adapter folder, autoencoder folder) of tiny random models."""
    root = tmp_path_factory.mktemp("image-parts")
    text = ColaPipeline.from_pretrained(fixture_dir)
    text.save_pretrained(root / "text")
    autoencoder = tiny_autoencoder()
    autoencoder.save_pretrained(root / "autoencoder")
    adapter = add_image_adapter(text.transformer, ImageLatentSpace.from_autoencoder(autoencoder), r=4)
    randomize_adapter(text.transformer, adapter)
    save_image_adapter(text.transformer, adapter, root / "adapter")
    return root / "text", root / "adapter", root / "autoencoder"


@pytest.fixture(scope="module")
def pipe(parts):
    pipe = ColaImagePriorPipeline.from_parts(*parts, fuse=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def captioner(pipe):
    return ColaCaptionPipeline(**pipe.components)


def rendered_images(n: int = 2) -> list[PIL.Image.Image]:
    from colabridge.data.shapes import make_examples

    return [PIL.Image.fromarray(e.image) for e in make_examples(n, seed=0)]


# --------------------------------------------------------------------------- text → image


def test_prompt_to_images_all_output_types(pipe):
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    out = pipe(["a small red circle on the left", "a blue square"], num_images_per_prompt=2, num_inference_steps=STEPS,
               generator=gen(), output_type="np")
    assert out.images.shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(out.images).all()
    assert out.latents.shape == (4, 4, 4, 4)  # (B·n, c, h, w)
    pil = pipe("a small red circle on the left", num_inference_steps=STEPS, generator=gen()).images
    assert len(pil) == 1 and pil[0].size == (IMAGE_SIZE, IMAGE_SIZE) and pil[0].mode == "RGB"
    latent = pipe("a small red circle on the left", num_inference_steps=STEPS, generator=gen(), output_type="latent")
    assert latent.images is None
    # the same seed gives the same image; the prompt conditions it
    torch.testing.assert_close(latent.latents, out.latents[:1])
    other = pipe("a large green cross at the top", num_inference_steps=STEPS, generator=gen(), output_type="latent")
    assert not torch.allclose(other.latents, latent.latents)


def test_packed_cfg_equals_two_pass_and_decode_matches_latents(pipe):
    kw = dict(num_inference_steps=STEPS, output_type="pt")
    packed = pipe("a cyan triangle below a red square", generator=torch.Generator().manual_seed(1), **kw)
    looped = pipe("a cyan triangle below a red square", generator=torch.Generator().manual_seed(1), packed_cfg=False, **kw)
    torch.testing.assert_close(packed.latents, looped.latents, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        decoded = pipe.autoencoder.decode(pipe.space.denormalize(packed.latents)).sample
    torch.testing.assert_close(packed.images, (decoded / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-5)


def test_unknown_words_and_empty_prompt_still_run(pipe):
    out = pipe(["a zorblax qwfp on the flibbertigibbet", ""], num_inference_steps=STEPS, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(out.images).all()


def test_prompt_history_is_left_aligned_before_the_image_block(pipe):
    """A prompt batched with a longer one gets the same image as alone (left padding, compact positions)."""
    noise = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(3))
    alone = pipe("a red circle", latents=noise, num_inference_steps=STEPS, output_type="latent").latents
    batched = pipe(["a red circle", "a very much longer prompt about a large blue cross near the bottom"],
                   latents=noise.repeat(2, 1, 1), num_inference_steps=STEPS, output_type="latent").latents
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-5)
    latents, valid = encode_captions(pipe.vae, pipe.tokenizer, ["a", "a much longer caption"], pipe.block_size,
                                     pipe.tokenizer.pad_token_id)
    assert latents.shape[1] % pipe.block_size == 0 and valid[:, -1].all() and not valid[0, 0]


def test_fused_pipeline_saves_loads_and_matches(parts, pipe, tmp_path):
    fused = ColaImagePriorPipeline.from_parts(*parts)  # fuse=True
    fused.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=STEPS, output_type="latent")
    expected = pipe("a small red circle", generator=torch.Generator().manual_seed(0), **kw).latents
    got = fused("a small red circle", generator=torch.Generator().manual_seed(0), **kw).latents
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="fuse_image_adapter"):
        pipe.save_pretrained(tmp_path / "unfused")
    fused.save_pretrained(tmp_path / "image")
    loaded = load_image_pipeline(ColaImagePriorPipeline, tmp_path / "image")
    loaded.set_progress_bar_config(disable=True)
    again = loaded("a small red circle", generator=torch.Generator().manual_seed(0), **kw).latents
    torch.testing.assert_close(again, got)
    assert isinstance(load_image_pipeline(ColaCaptionPipeline, tmp_path / "image"), ColaCaptionPipeline)


@pytest.mark.parametrize("kwargs, match", [
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 2.5}, "num_inference_steps"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
    ({"output_type": "jpeg"}, "output_type"),
    ({"latents": torch.zeros(1, 3, 4)}, r"latents.*\(1, 16, 4\)"),
    ({"solver": "rk4"}, "solver"),
])
def test_image_pipeline_bad_arguments(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe("a red circle", **{"num_inference_steps": STEPS, **kwargs})


def test_image_pipeline_bad_prompt_and_mismatched_components(pipe):
    with pytest.raises(TypeError, match="prompt"):
        pipe(["a red circle", 3])
    flux_like = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                              layers_per_block=1, latent_channels=16, norm_num_groups=4, sample_size=IMAGE_SIZE)
    with pytest.raises(ValueError, match=r"\(4, 4, 4\).*\(16, 4, 4\)"):
        ColaImagePriorPipeline(**{**pipe.components, "autoencoder": flux_like})


# --------------------------------------------------------------------------- image → caption


def test_caption_pipeline_runs_on_images_arrays_and_tensors(captioner):
    images = rendered_images(2)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    out = captioner(images, max_new_tokens=8, num_inference_steps=STEPS, generator=gen())
    assert len(out.texts) == 2 and all(isinstance(t, str) for t in out.texts)
    assert out.latents.shape[0] == 2 and out.latents.shape[1] % captioner.block_size == 0
    ids = captioner(np.stack([np.asarray(im) for im in images]), max_new_tokens=8, num_inference_steps=STEPS,
                    output_type="ids", generator=gen())
    assert ids.texts is None and ids.sequences == out.sequences
    pixels = torch.from_numpy(np.array(images[0])).permute(2, 0, 1).float() / 127.5 - 1.0
    single = captioner(pixels, max_new_tokens=8, num_inference_steps=STEPS, output_type="latent")
    assert single.latents.shape == (1, 8, captioner.vae.config.latent_dim)


def test_caption_depends_on_the_image_and_packed_equals_two_pass(captioner):
    images = rendered_images(2)
    kw = dict(max_new_tokens=4, num_inference_steps=STEPS, output_type="latent")
    a = captioner(images[0], generator=torch.Generator().manual_seed(0), **kw).latents
    b = captioner(images[1], generator=torch.Generator().manual_seed(0), **kw).latents
    assert not torch.allclose(a, b)
    looped = captioner(images[0], generator=torch.Generator().manual_seed(0), packed_cfg=False, **kw).latents
    torch.testing.assert_close(looped, a, atol=1e-5, rtol=1e-5)


def test_caption_stops_at_stop_ids(captioner):
    image = rendered_images(1)[0]
    free = captioner(image, max_new_tokens=8, num_inference_steps=STEPS, output_type="ids",
                     generator=torch.Generator().manual_seed(0), stop_token_ids=[])
    first = free.sequences[0][1]  # stop on the second generated id
    out = captioner(image, max_new_tokens=8, num_inference_steps=STEPS, output_type="ids",
                    generator=torch.Generator().manual_seed(0), stop_token_ids=[first])
    assert out.finished.all() and out.sequences[0] == free.sequences[0][: free.sequences[0].index(first)]


def test_caption_bad_images(captioner):
    image = rendered_images(1)[0]
    with pytest.raises(ValueError, match="mode 'L'.*convert"):
        captioner(image.convert("L"))
    with pytest.raises(ValueError, match="32×32.*resize"):
        captioner(image.resize((64, 64)))
    with pytest.raises(ValueError, match="uint8"):
        captioner(np.asarray(image).astype(np.float64))
    with pytest.raises(ValueError, match="32×32"):
        captioner(torch.zeros(1, 3, 16, 16))
    with pytest.raises(TypeError, match="PIL image"):
        captioner("image.png")
    with pytest.raises(ValueError, match="max_new_tokens"):
        captioner(image, max_new_tokens=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        captioner(image, guidance_scale=-2)


def test_caption_candidates_keep_the_lowest_denoising_error(captioner):
    image = rendered_images(1)[0]
    kw = dict(max_new_tokens=8, num_inference_steps=STEPS)
    gen = torch.Generator().manual_seed(3)
    candidates = captioner([image] * 4, generator=gen, **kw).texts  # the same draws as num_candidates=4
    errors = captioner.score_captions(image, candidates, generator=gen)  # then the same scoring noise
    out = captioner(image, num_candidates=4, generator=torch.Generator().manual_seed(3), **kw)
    assert errors.shape == (1, 4) and out.texts[0] in candidates
    torch.testing.assert_close(out.scores, errors.min(1).values)
    assert out.texts[0] == candidates[int(errors.argmin())]
    assert captioner(image, generator=torch.Generator().manual_seed(3), **kw).scores is None
    ids = captioner(image, num_candidates=4, generator=torch.Generator().manual_seed(3), output_type="ids", **kw)
    assert ids.texts is None and ids.sequences == out.sequences and out.latents.shape[0] == 1


def test_score_captions_shares_noise_per_image_and_depends_on_the_caption(captioner):
    images = rendered_images(2)
    texts = [["a red circle", "a blue square", "a red circle"], ["a green cross", "a green cross", "a cyan disc"]]
    errors = captioner.score_captions(images, texts, score_timesteps=3, generator=torch.Generator().manual_seed(0))
    assert errors.shape == (2, 3) and torch.isfinite(errors).all()
    assert errors[0, 0] == errors[0, 2] and errors[1, 0] == errors[1, 1]  # same caption, same image: same error
    assert errors[0, 0] != errors[0, 1] and errors[1, 0] != errors[1, 2]
    again = captioner.score_captions(images, texts, score_timesteps=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, errors)


def test_caption_reranking_bad_arguments(captioner):
    image = rendered_images(1)[0]
    for bad in (0, 65, 2.5, True):
        with pytest.raises(ValueError, match="num_candidates"):
            captioner(image, num_candidates=bad)
    with pytest.raises(ValueError, match="score_timesteps"):
        captioner(image, num_candidates=2, score_timesteps=0)
    with pytest.raises(ValueError, match="one non-empty list of str per image"):
        captioner.score_captions(rendered_images(2), ["a red circle"])
    with pytest.raises(ValueError, match="one non-empty list of str per image"):
        captioner.score_captions(image, [])
    with pytest.raises(ValueError, match="one non-empty list of str per image"):
        captioner.score_captions(rendered_images(2), [["a red circle"], [3]])
    one = captioner.score_captions(image, "a red circle", generator=torch.Generator().manual_seed(0))
    assert one.shape == (1, 1)
    torch.testing.assert_close(one, captioner.score_captions(image, [["a red circle"]], generator=torch.Generator().manual_seed(0)))


# --------------------------------------------------------------------------- CLI


def test_cli_imagine_and_caption(parts, tmp_path, capsys):
    from colabridge.cli import main

    ColaImagePriorPipeline.from_parts(*parts).save_pretrained(tmp_path / "image")
    main(["imagine", "a small red circle on the left", "-o", str(tmp_path / "out.png"), "--model",
          str(tmp_path / "image"), "--steps", "2", "-n", "2"])
    written = [tmp_path / "out-0.png", tmp_path / "out-1.png"]
    assert capsys.readouterr().out.split() == [str(p) for p in written]
    assert PIL.Image.open(written[0]).size == (IMAGE_SIZE, IMAGE_SIZE)
    text, adapter, autoencoder = parts  # a text pipeline + adapter + autoencoder works as well
    main(["caption", str(written[0]), "--model", str(text), "--adapter", str(adapter), "--autoencoder",
          str(autoencoder), "--steps", "2", "--max-new-tokens", "4", "--num-candidates", "3"])
    assert capsys.readouterr().out.endswith("\n")
    with pytest.raises(SystemExit, match="num_candidates"):
        main(["caption", str(written[0]), "--model", str(tmp_path / "image"), "--num-candidates", "0"])
    PIL.Image.open(written[0]).resize((64, 64)).save(tmp_path / "big.png")
    with pytest.raises(SystemExit, match="32×32"):
        main(["caption", str(tmp_path / "big.png"), "--model", str(tmp_path / "image"), "--steps", "2"])
    with pytest.raises(SystemExit, match="guidance_scale"):
        main(["imagine", "a red circle", "--model", str(tmp_path / "image"), "--guidance-scale", "-1"])
    with pytest.raises(SystemExit, match="both an image adapter folder and an autoencoder"):
        main(["imagine", "a red circle", "--model", str(text), "--adapter", str(adapter)])


# --------------------------------------------------------------------------- training script


def test_shapes_adapter_training_script_resumes_exactly_and_exports(parts, tmp_path):
    """Stop at two of three steps + resume == three in one go (bit-exact weights); export + evaluation, tiny models."""
    import json

    from safetensors.torch import load_file

    from colabridge.adapters.train_shapes import main as train_main
    from colabridge.training.checkpointing import latest_checkpoint, load_model_weights, read_state

    text, _, autoencoder = parts

    def args(run):
        return ["--text-model", str(text), "--autoencoder", str(autoencoder), "--out", str(tmp_path / run),
                "--batch-size", "2", "--num-train", "4", "--rank", "2", "--patch-size", "1", "--checkpoint-every", "1"]

    train_main(args("resumed") + ["--steps", "3", "--stop-at-step", "2"])  # as if killed after checkpoint 2
    train_main(args("resumed") + ["--steps", "3"])
    train_main(args("straight") + ["--steps", "3"])
    resumed, straight = (latest_checkpoint(tmp_path / run) for run in ("resumed", "straight"))
    assert read_state(resumed)["step"] == read_state(straight)["step"] == 3
    a, b = load_model_weights(resumed), load_model_weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    train_main(args("resumed") + ["--steps", "3", "--export", str(tmp_path / "adapter"), "--pipeline", str(tmp_path / "pipe"),
                                  "--eval-num", "2", "--eval-steps", "1", "--eval-guidance", "1", "--eval-candidates", "2"])
    metrics = json.loads((tmp_path / "adapter" / "metrics.json").read_text())
    assert metrics["step"] == 3 and 0 <= metrics["heldout_cfg1"]["text_to_image"]["all"] <= 1
    assert metrics["heldout_cfg1"]["image_to_text_rerank"]["num_candidates"] == 2
    assert metrics["train_cfg1"]["split"] == "train"
    assert PIL.Image.open(tmp_path / "adapter" / "grid.png").size == (4 * 4 * IMAGE_SIZE, 6 * 4 * IMAGE_SIZE)
    assert isinstance(load_image_pipeline(ColaCaptionPipeline, tmp_path / "pipe"), ColaCaptionPipeline)

    # warm start: a zero-LR step from the exported adapter re-exports exactly its weights
    export = ["--export", str(tmp_path / "again"), "--eval-num", "1", "--eval-steps", "1", "--eval-guidance", "1",
              "--eval-candidates", "1"]
    warm = args("warm") + ["--steps", "1", "--lr", "0", "--init-adapter", str(tmp_path / "adapter")]
    train_main(warm)
    train_main(warm + export)
    for name in ("adapter_model.safetensors", "projections/diffusion_pytorch_model.safetensors"):
        a, b = (load_file(str(tmp_path / folder / name)) for folder in ("adapter", "again"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="LoRA rank 2 but --rank is 4; pass --rank 2"):
        train_main([*args("other"), "--rank", "4", "--steps", "1", "--init-adapter", str(tmp_path / "adapter")])


# --------------------------------------------------------------------------- shipped artifacts

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "pipelines" / "shapes-autoencoder").is_dir(), reason="shapes autoencoder not shipped")
def test_shipped_shapes_autoencoder_preserves_heldout_attributes():
    from colabridge.data.shapes import make_examples, score
    from colabridge.data.train_shapes_autoencoder import reconstruct

    vae = AutoencoderKL.from_pretrained(ROOT / "pipelines" / "shapes-autoencoder").eval()
    examples = make_examples(24, seed=99, split="heldout")
    recon = reconstruct(vae, np.stack([e.image for e in examples]))
    assert all(score(r, e.scene)["all"] for r, e in zip(recon, examples))


@pytest.mark.skipif(not (ROOT / "adapters" / "shapes-image").is_dir(), reason="shapes image adapter not shipped")
def test_shipped_image_bridge_loads_offline_and_generates():
    from colabridge.image_cli import default_parts

    pipe = ColaImagePriorPipeline.from_parts(*default_parts())
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a small red circle on the left", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    text = ColaCaptionPipeline(**pipe.components)(image, num_inference_steps=4, max_new_tokens=8).texts[0]
    assert isinstance(text, str)


@pytest.mark.skipif(not (ROOT / "adapters" / "shapes-image").is_dir(), reason="shapes image adapter not shipped")
def test_shipped_adapter_scores_the_true_caption_of_heldout_images_lowest():
    """The reranker of ``num_candidates``: the text → image error must prefer the caption that names the
    image's colour and shape over the same caption with either changed (held-out compositions)."""
    import dataclasses

    from colabridge.data.shapes import COLORS, SHAPES, make_caption, make_examples
    from colabridge.image_cli import default_parts

    captioner = ColaCaptionPipeline(**ColaImagePriorPipeline.from_parts(*default_parts()).components)
    scenes = [e for e in make_examples(40, seed=5, split="heldout") if len(e.scene.objects) == 1][:8]
    for example in scenes:
        obj = example.scene.objects[0]
        variants = (obj, dataclasses.replace(obj, color=next(c for c in COLORS if c != obj.color)),
                    dataclasses.replace(obj, shape=next(s for s in SHAPES if s != obj.shape)))
        texts = [make_caption(dataclasses.replace(example.scene, objects=(v,)), np.random.default_rng(1)) for v in variants]
        errors = captioner.score_captions(example.image, texts, generator=torch.Generator().manual_seed(0))[0]
        assert int(errors.argmin()) == 0, (texts, errors)
