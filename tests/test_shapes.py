"""The procedural shapes world: sampling, rendering, captions and the exact attribute readers."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from colabridge.data.shapes import (
    COLORS, HELDOUT_PAIRS, POSITIONS, RELATIONS, SHAPES, SIZES, Scene, SceneObject, make_caption, make_examples,
    parse_caption, read_attributes, render_scene, sample_scene, score, score_caption,
)


def scenes(n, seed=0, split="train", **kw):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split, **kw) for _ in range(n)]


@pytest.mark.parametrize("image_size,n", [(32, 300), (64, 80)])
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_readers_recover_every_attribute_of_rendered_scenes(image_size, n, split):
    failures = [(s, score(render_scene(s, image_size), s)) for s in scenes(n, seed=image_size, split=split)]
    failures = [f for f in failures if not f[1]["all"]]
    assert not failures, failures[:3]


def test_readers_report_geometry():
    scene = Scene((SceneObject("square", "green", "large", (0.5, 0.5)),), position="center")
    (obj,) = read_attributes(render_scene(scene, 32))
    assert (obj["color"], obj["shape"], obj["size"], obj["position"]) == ("green", "square", "large", "center")
    assert obj["area"] == 14 * 14 and obj["extent"] == pytest.approx(14 / 32)
    assert obj["center"] == pytest.approx((0.5, 0.5), abs=1 / 32)


def test_score_flags_exactly_the_wrong_attribute():
    rng = np.random.default_rng(3)
    scene = sample_scene(rng, num_objects=1)
    other_shape = next(s for s in SHAPES if s != scene.objects[0].shape)
    wrong = Scene((dataclasses.replace(scene.objects[0], shape=other_shape),), position=scene.position)
    result = score(render_scene(wrong), scene)
    assert result["shape"] is False and result["all"] is False
    assert all(result[k] for k in ("count", "color", "size", "position"))
    swapped = sample_scene(rng, num_objects=2)
    flipped = Scene(swapped.objects[::-1], relation=swapped.relation)  # same layout, relation reversed
    assert score(render_scene(swapped), flipped)["relation"] is False


def test_blank_image_scores_nothing():
    scene = scenes(1, num_objects=1)[0]
    blank = np.zeros((32, 32, 3), np.uint8)
    assert read_attributes(blank) == []
    assert not any(score(blank, scene).values())


def test_image_formats_agree():
    scene = scenes(1, seed=5, num_objects=2)[0]
    array = render_scene(scene)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W) in [-1, 1]
    expected = read_attributes(array)
    assert read_attributes(Image.fromarray(array)) == expected
    assert read_attributes(array.astype(np.float32) / 255.0) == expected
    assert read_attributes(tensor) == expected


@pytest.mark.parametrize("bad,match", [
    (Image.new("L", (32, 32)), "mode 'L'"), (np.zeros((32, 32)), r"\(H, W, 3\)"), (torch.zeros(1, 32, 32), r"\(3, H, W\)"),
])
def test_bad_images_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        read_attributes(bad)


def test_bad_arguments_raise():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="split"):
        sample_scene(rng, "test")
    with pytest.raises(ValueError, match="num_objects"):
        sample_scene(rng, num_objects=3)
    with pytest.raises(ValueError, match="image_size"):
        render_scene(sample_scene(rng), 48)


def test_deterministic_from_seed():
    a, b, c = make_examples(20, seed=7), make_examples(20, seed=7), make_examples(20, seed=8)
    assert [e.caption for e in a] == [e.caption for e in b]
    assert [e.scene for e in a] == [e.scene for e in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert [e.caption for e in a] != [e.caption for e in c]


def test_heldout_pairs_never_in_train_and_always_in_heldout():
    train, held = scenes(2000, seed=1), scenes(500, seed=2, split="heldout")
    train_pairs = {(o.shape, o.color) for s in train for o in s.objects}
    assert not train_pairs & HELDOUT_PAIRS
    assert train_pairs == {(s, c) for s in SHAPES for c in COLORS} - HELDOUT_PAIRS  # every other pair trains
    assert all(s.is_heldout for s in held)
    assert {(o.shape, o.color) for s in held for o in s.objects} >= HELDOUT_PAIRS


def test_scenes_cover_every_attribute_and_pairs_have_distinct_colors():
    train = scenes(500, seed=4)
    objs = [o for s in train for o in s.objects]
    assert {o.shape for o in objs} == set(SHAPES) and {o.color for o in objs} == set(COLORS)
    assert {o.size for o in objs} == set(SIZES)
    assert {s.position for s in train if len(s.objects) == 1} == set(POSITIONS)
    assert {s.relation for s in train if len(s.objects) == 2} == set(RELATIONS)
    assert all(s.objects[0].color != s.objects[1].color for s in train if len(s.objects) == 2)


def test_captions_name_every_attribute_and_vary():
    rng = np.random.default_rng(0)
    pairs = [(s, make_caption(s, rng)) for s in scenes(400, seed=6)]
    assert all(score_caption(c, s)["all"] for s, c in pairs), [c for s, c in pairs if not score_caption(c, s)["all"]][:3]
    assert all(o.color in c for s, c in pairs for o in s.objects)
    assert len({c for _, c in pairs}) > 300  # templates and paraphrases, not one fixed wording


def test_score_caption_accepts_the_converse_reading_of_a_pair():
    scene = Scene([SceneObject("square", "magenta", "large", (0.5, 0.7)), SceneObject("square", "blue", "large", (0.5, 0.3))],
                  relation="below")
    assert score_caption("a large magenta square below a big blue square", scene)["all"]
    assert score_caption("there is a big blue square above a large magenta square", scene)["all"]
    wrong = score_caption("a big blue square below a large magenta square", scene)  # reversed, same relation
    assert not wrong["all"] and wrong["shape"] and wrong["size"] and not (wrong["color"] and wrong["relation"])
    swapped = score_caption("a large blue square below a big magenta square", scene)  # colours swapped
    assert not swapped["all"] and not swapped["color"]
    one = score_caption("a large magenta square", scene)
    assert not one["count"] and not one["all"]


def test_parse_caption_paraphrases_and_unknown_words():
    parsed = parse_caption("A big blue plus sign to the left of a tiny red disc!")
    assert parsed["objects"] == [{"size": "large", "color": "blue", "shape": "cross"},
                                 {"size": "small", "color": "red", "shape": "circle"}]
    assert parsed["relation"] == "left of"
    assert parse_caption("In the middle, a little green triangle.")["position"] == "center"
    assert parse_caption("a zorblax wibble") == {"objects": [], "position": None, "relation": None}


# --------------------------------------------------------------------------- autoencoder training script

AE_ARGS = ["--steps", "4", "--batch-size", "2", "--block-out-channels", "16", "--latent-channels", "2",
           "--warmup", "2", "--log-every", "1", "--checkpoint-every", "1", "--eval-every", "100", "--eval-num", "2"]


def test_autoencoder_script_resumes_exactly(tmp_path, crash_after_checkpoint):
    """4 steps in one go == 2 steps, a crash right after checkpoint-2, then a resume: same log, same weights."""
    from safetensors.torch import load_file

    from colabridge.data import train_shapes_autoencoder as S

    S.main(["--out", str(tmp_path / "full")] + AE_ARGS)
    restore = crash_after_checkpoint(S, 2)
    with pytest.raises(Exception, match="simulated kill"):
        S.main(["--out", str(tmp_path / "split")] + AE_ARGS)
    restore()
    S.main(["--out", str(tmp_path / "split")] + AE_ARGS)

    def columns(run):  # step, lr, mse, kl (elapsed time differs)
        return [line.split(",")[:1] + line.split(",")[2:] for line in (tmp_path / run / "log.csv").read_text().splitlines()]

    assert columns("split") == columns("full") and len(columns("full")) == 4
    full, split = S.latest_checkpoint(tmp_path / "full"), S.latest_checkpoint(tmp_path / "split")
    assert full.name == split.name == "checkpoint-4" and len(list(full.parent.iterdir())) == 1
    a, b = load_file(str(full / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    S.main(["--out", str(tmp_path / "full"), "--export", str(tmp_path / "export"), "--eval-num", "2"])
    assert json.loads((tmp_path / "export" / "metrics.json").read_text())["step"] == 4
