"""A procedural shapes world: images, captions and exact attribute readers.

A *scene* holds one or two filled objects on a plain black background. Every object has a shape
(:data:`SHAPES`), a pure saturated colour (:data:`COLORS`) and a size (:data:`SIZES`); a one-object
scene places it at a :data:`POSITIONS` anchor, a two-object scene relates the first object to the
second (:data:`RELATIONS`, e.g. ``"a blue square above a yellow triangle"``). Objects of one scene
have distinct colours, so colour identifies an object and the readers can segment by hue.

Everything is deterministic from a ``numpy.random.Generator``: :func:`sample_scene` draws a scene,
:func:`render_scene` draws it, :func:`make_caption` words it (several templates and paraphrases).
The (shape, colour) pairs in :data:`HELDOUT_PAIRS` never occur in the ``"train"`` split and every
``"heldout"`` scene has at least one of them, so held-out compositions measure generalisation.

The readers score *any* RGB image (rendered, reconstructed or generated) by pixel analysis:
:func:`read_attributes` segments saturated pixels by nearest hue into connected components and reads
each component's colour, shape (template match of its bounding-box crop), size (extent) and centroid;
:func:`score` compares that with a scene, attribute by attribute. :func:`parse_caption` reads a
caption back into attributes, so generated captions are scored the same way.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "cross")
# pure saturated hues (RGB in 0..255) and their hue angle in degrees
COLORS = {
    "red": ((255, 0, 0), 0.0),
    "yellow": ((255, 255, 0), 60.0),
    "green": ((0, 255, 0), 120.0),
    "cyan": ((0, 255, 255), 180.0),
    "blue": ((0, 0, 255), 240.0),
    "magenta": ((255, 0, 255), 300.0),
}
SIZES = {"small": 0.25, "large": 0.4375}  # object extent as a fraction of the image side
POSITIONS = {  # anchor centre (x, y) as fractions of the image side, y downwards
    "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5),
}
RELATIONS = ("above", "below", "left of", "right of")
# (shape, colour) compositions kept out of every training split; each shape and colour still trains
HELDOUT_PAIRS = frozenset({("circle", "yellow"), ("square", "magenta"), ("triangle", "cyan"), ("cross", "red")})
SPLITS = ("train", "heldout")
IMAGE_SIZES = (32, 64)
BACKGROUND = (0, 0, 0)
TWO_OBJECT_PROB = 0.5  # share of two-object (relation) scenes
JITTER = 0.03  # max offset of a centre from its anchor, fraction of the image side
PAIR_OFFSET = 0.235  # distance of each object of a pair from the image centre, fraction of the side
SUPERSAMPLE = 4  # sub-pixel samples per axis when rasterising; a pixel is on if half its samples are


@dataclass(frozen=True)
class SceneObject:
    """One filled object; ``center`` is ``(x, y)`` in fractions of the image side (y downwards)."""

    shape: str
    color: str
    size: str
    center: tuple[float, float]


@dataclass(frozen=True)
class Scene:
    """One object at ``position``, or two with ``relation`` = relation of ``objects[0]`` to ``objects[1]``."""

    objects: tuple[SceneObject, ...]
    position: str | None = None
    relation: str | None = None

    @property
    def is_heldout(self) -> bool:
        return any((o.shape, o.color) in HELDOUT_PAIRS for o in self.objects)


# --------------------------------------------------------------------------- sampling


def _draw_object(rng: np.random.Generator, split: str, exclude_colors=(), force_heldout: bool = False):
    """(shape, colour, size) allowed in ``split``; ``force_heldout`` draws a held-out pair."""
    if force_heldout:
        pairs = sorted(p for p in HELDOUT_PAIRS if p[1] not in exclude_colors)
    else:
        pairs = [(s, c) for s in SHAPES for c in COLORS
                 if c not in exclude_colors and (split == "heldout" or (s, c) not in HELDOUT_PAIRS)]
    shape, color = pairs[rng.integers(len(pairs))]
    return shape, color, tuple(SIZES)[rng.integers(len(SIZES))]


def _jittered(rng: np.random.Generator, anchor: tuple[float, float]) -> tuple[float, float]:
    dx, dy = rng.uniform(-JITTER, JITTER, size=2)
    return float(anchor[0] + dx), float(anchor[1] + dy)


def _pair_anchors(relation: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Anchors of (first, second) object so that the first is ``relation`` the second."""
    lo, hi = 0.5 - PAIR_OFFSET, 0.5 + PAIR_OFFSET
    return {
        "above": ((0.5, lo), (0.5, hi)), "below": ((0.5, hi), (0.5, lo)),
        "left of": ((lo, 0.5), (hi, 0.5)), "right of": ((hi, 0.5), (lo, 0.5)),
    }[relation]


def sample_scene(rng: np.random.Generator, split: str = "train", num_objects: int | None = None) -> Scene:
    """Draw a scene of ``split`` (``"train"``: no held-out pair; ``"heldout"``: at least one).

    ``num_objects`` (1 or 2) defaults to a draw with :data:`TWO_OBJECT_PROB`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if num_objects is None:
        num_objects = 2 if rng.random() < TWO_OBJECT_PROB else 1
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects}.")
    heldout_slot = int(rng.integers(num_objects)) if split == "heldout" else -1
    attrs = []
    for i in range(num_objects):
        taken = [a[1] for a in attrs]
        attrs.append(_draw_object(rng, split, taken, force_heldout=i == heldout_slot))
    if num_objects == 1:
        position = tuple(POSITIONS)[rng.integers(len(POSITIONS))]
        return Scene((SceneObject(*attrs[0], _jittered(rng, POSITIONS[position])),), position=position)
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    objects = tuple(SceneObject(*a, _jittered(rng, anchor)) for a, anchor in zip(attrs, _pair_anchors(relation)))
    return Scene(objects, relation=relation)


# --------------------------------------------------------------------------- rendering


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of ``shape`` in normalised coordinates ``u, v ∈ [-1, 1]`` (v downwards).

    All shapes fill the square ``[-1, 1]²`` bounding box, so extent = size for every shape.
    """
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (au <= 1.0) & (av <= 1.0)
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return (av <= 1.0) & (au <= (v + 1.0) / 2.0)
    if shape == "cross":  # plus sign, arms a third of the extent wide
        return ((au <= 1 / 3) & (av <= 1.0)) | ((av <= 1 / 3) & (au <= 1.0))
    raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}.")


def _object_coverage(obj: SceneObject, image_size: int) -> np.ndarray:
    """Fraction of each pixel's sub-samples inside ``obj``: ``(H, W)`` in [0, 1]."""
    n = image_size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n  # sub-sample centres as fractions of the side
    half = SIZES[obj.size] / 2
    u = (coords[None, :] - obj.center[0]) / half
    v = (coords[:, None] - obj.center[1]) / half
    inside = shape_mask(obj.shape, u, v).astype(np.float32)  # (n, n)
    return inside.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE).mean(axis=(1, 3))


def render_scene(scene: Scene, image_size: int = 32) -> np.ndarray:
    """RGB image ``(H, W, 3)`` uint8 of ``scene``: aliased pure colours on :data:`BACKGROUND`."""
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size}.")
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in scene.objects:
        image[_object_coverage(obj, image_size) >= 0.5] = COLORS[obj.color][0]
    return image


# --------------------------------------------------------------------------- captions

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square",), "triangle": ("triangle",),
               "cross": ("cross", "plus sign")}
POSITION_PHRASES = {
    "left": ("on the left", "at the left", "in the left half"),
    "right": ("on the right", "at the right", "in the right half"),
    "top": ("at the top", "near the top", "in the upper half"),
    "bottom": ("at the bottom", "near the bottom", "in the lower half"),
    "center": ("in the center", "in the middle", "in the centre"),
}
RELATION_PHRASES = {
    "above": ("above", "over"), "below": ("below", "under", "beneath"),
    "left of": ("to the left of", "left of"), "right of": ("to the right of", "right of"),
}
ONE_OBJECT_TEMPLATES = ("a {obj} {pos}", "there is a {obj} {pos}", "{pos}, a {obj}", "a picture of a {obj} {pos}")
TWO_OBJECT_TEMPLATES = ("a {a} {rel} a {b}", "there is a {a} {rel} a {b}", "a picture of a {a} {rel} a {b}")


def _pick(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def describe_object(obj: SceneObject, rng: np.random.Generator) -> str:
    """``"<size> <colour> <shape>"`` with paraphrased size and shape words."""
    return f"{_pick(rng, SIZE_WORDS[obj.size])} {obj.color} {_pick(rng, SHAPE_WORDS[obj.shape])}"


def make_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming every attribute of ``scene``, from a random template and paraphrases."""
    if len(scene.objects) == 1:
        template = _pick(rng, ONE_OBJECT_TEMPLATES)
        text = template.format(obj=describe_object(scene.objects[0], rng), pos=_pick(rng, POSITION_PHRASES[scene.position]))
    else:
        a, b = (describe_object(o, rng) for o in scene.objects)
        text = _pick(rng, TWO_OBJECT_TEMPLATES).format(a=a, b=b, rel=_pick(rng, RELATION_PHRASES[scene.relation]))
    return text[0].upper() + text[1:] + "."


def _phrase_table(table: dict) -> list[tuple[str, str]]:
    """(phrase, value) pairs, longest phrase first so ``"to the left of"`` wins over ``"left of"``."""
    return sorted(((p, v) for v, ps in table.items() for p in ps), key=lambda pv: -len(pv[0]))


def parse_caption(text: str) -> dict:
    """Attributes named by a caption: ``{"objects": [{shape, color, size}], "position", "relation"}``.

    Objects are ``<size> <colour> <shape>`` phrases in reading order; unknown words are ignored and
    a missing attribute reads as ``None``.
    """
    text = " " + re.sub(r"[^a-z ]+", " ", text.lower()) + " "
    words = "|".join(w for ws in SIZE_WORDS.values() for w in ws)
    shapes = "|".join(p for p, _ in _phrase_table(SHAPE_WORDS))
    pattern = rf"(?:\b({words})\s+)?\b({'|'.join(COLORS)})\s+({shapes})\b"
    size_of = {w: s for s, ws in SIZE_WORDS.items() for w in ws}
    shape_of = dict(_phrase_table(SHAPE_WORDS))
    objects, rest = [], text
    for m in re.finditer(pattern, text):
        objects.append({"size": size_of.get(m.group(1)), "color": m.group(2), "shape": shape_of[m.group(3)]})
        rest = rest.replace(m.group(0), " ", 1)
    rest = re.sub(r"\s+", " ", rest)
    if len(objects) >= 2:
        return {"objects": objects, "position": None, "relation": _find_phrase(rest, RELATION_PHRASES)}
    return {"objects": objects, "position": _find_phrase(rest, POSITION_PHRASES), "relation": None}


def _find_phrase(text: str, table: dict) -> str | None:
    """Value of the longest phrase of ``table`` found as whole words in ``text`` (None if none)."""
    return next((v for p, v in _phrase_table(table) if f" {p} " in text), None)


# --------------------------------------------------------------------------- readers

SATURATION_MIN = 0.5  # a pixel is object (not background) if saturated …
VALUE_MIN = 0.4  # … and bright enough (max channel)
MIN_AREA_FRAC = 0.25  # components smaller than this share of a small square are noise
TEMPLATE_GRID = 8  # shape templates compare bounding-box crops resampled to 8×8


def as_rgb_array(image) -> np.ndarray:
    """``(H, W, 3)`` float array in [0, 1] from a PIL RGB image, an ``(H, W, 3)`` uint8/float array,
    or a torch ``(3, H, W)`` tensor in [-1, 1] (diffusers' decoded-image convention)."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode!r}; use image.convert('RGB').")
        return np.asarray(image, dtype=np.float32) / 255.0
    if hasattr(image, "detach"):  # torch tensor, CHW in [-1, 1]
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) tensor in [-1, 1], got shape {tuple(image.shape)}.")
        return ((image.detach().float().cpu().permute(1, 2, 0).numpy() + 1.0) / 2.0).clip(0.0, 1.0)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {array.shape}.")
    return array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32).clip(0.0, 1.0)


def hue_labels(rgb: np.ndarray) -> np.ndarray:
    """Index into :data:`COLORS` of each pixel's nearest hue, ``-1`` for background: ``(H, W)``."""
    high, low = rgb.max(-1), rgb.min(-1)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-8), 0.0)
    foreground = (high >= VALUE_MIN) & (saturation >= SATURATION_MIN)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2.0 * r - g - b)) % 360.0  # (H, W)
    centres = np.array([h for _, h in COLORS.values()])
    dist = np.abs((hue[..., None] - centres + 180.0) % 360.0 - 180.0)  # (H, W, K) circular distance
    return np.where(foreground, dist.argmin(-1), -1)


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean ``(H, W)`` mask, as boolean masks (largest first)."""
    height, width = mask.shape
    labels = np.where(mask, np.arange(height * width).reshape(height, width), height * width)
    while True:  # propagate the minimum label to 4-neighbours until stable (images are small)
        padded = np.pad(labels, 1, constant_values=height * width)
        neighbours = np.stack((padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:], labels))
        new = np.where(mask, neighbours.min(0), height * width)
        if np.array_equal(new, labels):
            break
        labels = new
    comps = [labels == lab for lab in np.unique(labels[mask])]
    return sorted(comps, key=lambda c: -int(c.sum()))


def _resample(mask: np.ndarray, grid: int = TEMPLATE_GRID) -> np.ndarray:
    """Bounding-box crop of ``mask`` averaged onto a ``grid × grid`` array in [0, 1]."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1].astype(np.float32)
    return np.asarray(Image.fromarray(crop, mode="F").resize((grid, grid), Image.Resampling.BOX), dtype=np.float32)


TEMPLATE_OFFSETS = 4  # sub-pixel offsets per axis at which templates are rasterised


@functools.lru_cache(maxsize=None)
def shape_templates(image_size: int) -> tuple[tuple[str, np.ndarray], ...]:
    """(shape, 8×8 crop) of every shape and size, rasterised at ``image_size`` with sub-pixel offsets.

    Templates go through the same rasterisation as rendered scenes, so a clean render always has a
    template at distance ~0 (aliasing nubs of small circles included).
    """
    out = []
    for shape in SHAPES:
        for size in SIZES:
            for dy in range(TEMPLATE_OFFSETS):
                for dx in range(TEMPLATE_OFFSETS):
                    center = (0.5 + dx / (TEMPLATE_OFFSETS * image_size), 0.5 + dy / (TEMPLATE_OFFSETS * image_size))
                    mask = _object_coverage(SceneObject(shape, "red", size, center), image_size) >= 0.5
                    out.append((shape, _resample(mask)))
    return tuple(out)


def classify_shape(mask: np.ndarray) -> str:
    """Shape of the nearest template (L2 on 8×8 resampled bounding-box crops) at the mask's scale."""
    crop = _resample(mask)
    return min(shape_templates(mask.shape[0]), key=lambda t: float(((crop - t[1]) ** 2).sum()))[0]


def _nearest(point: tuple[float, float], anchors: dict) -> str:
    return min(anchors, key=lambda k: (anchors[k][0] - point[0]) ** 2 + (anchors[k][1] - point[1]) ** 2)


def read_attributes(image) -> list[dict]:
    """Objects found in ``image``, largest first: ``{color, shape, size, center, extent, area, position}``.

    ``center`` and ``extent`` are fractions of the image side; ``position`` is the nearest
    :data:`POSITIONS` anchor; ``size`` the nearest :data:`SIZES` extent.
    """
    rgb = as_rgb_array(image)
    side = rgb.shape[0]
    labels = hue_labels(rgb)
    min_area = MIN_AREA_FRAC * (SIZES["small"] * side) ** 2
    names = list(COLORS)
    found = []
    for k, color in enumerate(names):
        for comp in connected_components(labels == k):
            if comp.sum() < min_area:
                continue
            ys, xs = np.nonzero(comp)
            extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / side
            center = (float((xs.mean() + 0.5) / side), float((ys.mean() + 0.5) / side))
            found.append({
                "color": color, "shape": classify_shape(comp),
                "size": min(SIZES, key=lambda s: abs(SIZES[s] - extent)),
                "center": center, "extent": float(extent), "area": int(comp.sum()),
                "position": _nearest(center, POSITIONS),
            })
    return sorted(found, key=lambda o: -o["area"])


def relation_between(a: dict, b: dict) -> str:
    """Relation of object ``a`` to object ``b`` along the axis where their centres differ most."""
    dx, dy = a["center"][0] - b["center"][0], a["center"][1] - b["center"][1]
    if abs(dx) > abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def score(image, scene: Scene) -> dict[str, bool]:
    """Per-attribute correctness of ``image`` against ``scene``.

    Keys: ``count`` (exactly the scene's number of objects found), ``color``, ``shape``, ``size``
    (for every scene object, an object of its colour was found with that shape / size),
    ``position`` (one object) or ``relation`` (two objects), and ``all``.
    """
    read = read_attributes(image)
    by_color = {}
    for obj in read:  # largest object of each colour
        by_color.setdefault(obj["color"], obj)
    matched = [by_color.get(o.color) for o in scene.objects]
    result = {
        "count": len(read) == len(scene.objects),
        "color": all(m is not None for m in matched),
        "shape": all(m is not None and m["shape"] == o.shape for m, o in zip(matched, scene.objects)),
        "size": all(m is not None and m["size"] == o.size for m, o in zip(matched, scene.objects)),
    }
    if len(scene.objects) == 1:
        result["position"] = matched[0] is not None and matched[0]["position"] == scene.position
    else:
        result["relation"] = None not in matched and relation_between(*matched) == scene.relation
    result["all"] = all(result.values())
    return result


CONVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def score_caption(text: str, scene: Scene) -> dict[str, bool]:
    """Per-attribute correctness of a caption against ``scene`` (same keys as :func:`score`).

    A two-object scene has two correct readings, "A left of B" and "B right of A": the caption's
    objects are matched to the scene's in reading order, or reversed with the converse relation,
    whichever agrees with more attributes (reading order on a tie).
    """
    parsed = parse_caption(text)
    objs = parsed["objects"]
    truth = [{"shape": o.shape, "color": o.color, "size": o.size} for o in scene.objects]
    if len(truth) == 1:
        return _caption_result(objs, truth, "position", parsed["position"], scene.position)
    forward = _caption_result(objs, truth, "relation", parsed["relation"], scene.relation)
    converse = _caption_result(objs[::-1], truth, "relation", parsed["relation"], CONVERSE[scene.relation])
    return converse if sum(converse.values()) > sum(forward.values()) else forward


def _caption_result(objs: list[dict], truth: list[dict], key: str, named, true_value) -> dict[str, bool]:
    """Per-attribute correctness of caption objects ``objs`` matched in order to ``truth``."""
    result = {"count": len(objs) == len(truth)}
    for attr in ("color", "shape", "size"):
        result[attr] = len(objs) == len(truth) and all(p[attr] == t[attr] for p, t in zip(objs, truth))
    result[key] = named == true_value
    result["all"] = all(result.values())
    return result


# --------------------------------------------------------------------------- datasets


@dataclass
class ShapesExample:
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    scene: Scene = field(repr=False)


def make_examples(num: int, seed: int, split: str = "train", image_size: int = 32) -> list[ShapesExample]:
    """``num`` (image, caption, scene) examples of ``split``, deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        scene = sample_scene(rng, split)
        out.append(ShapesExample(render_scene(scene, image_size), make_caption(scene, rng), scene))
    return out


__all__ = [
    "COLORS", "HELDOUT_PAIRS", "POSITIONS", "RELATIONS", "SHAPES", "SIZES", "Scene", "SceneObject", "ShapesExample",
    "as_rgb_array", "classify_shape", "make_caption", "make_examples", "parse_caption", "read_attributes",
    "relation_between", "render_scene", "sample_scene", "score", "score_caption",
]
