"""Synthetic caption-image data for the lab: structured scenes, under-determined captions, planted duplicates.

Images are 16x16 RGB scenes: a smooth two-colour linear-gradient background with 2-4 flat-coloured shapes
(circle, square, triangle, ring, diamond, horizontal bar, vertical bar) of random size and position, painted
in order. Pixel values are in [-1, 1] (float32, shape [N, 3, 16, 16]).

A caption names one or two of the scene's shapes by colour and kind and surrounds them with 1-5 random
ordinary "filler" words (``"vintage harbor with a red circle and a blue ring, morning poster"``). It
under-determines its image: positions, sizes, the other shapes and the background are free, so many images
fit one caption, and each ordinary caption is drawn fresh (seen about once in training), as most captions of
web-scale sets are. A planted set of images, drawn by the same generator (so their captions do not stand
out by form), is repeated many times at several duplication tiers, some always with one caption and some
with several different captions, as duplicated images were in LAION (Somepalli et al. 2023; Carlini et
al. 2023; Webster 2023).

Everything is a pure function of integer seeds: the training stream for step ``s`` is drawn from
``numpy.random.default_rng([seed, STREAM_ORDINARY, s])``, so a run can resume at any step and the whole
training set can be re-drawn for the nearest-neighbour search of the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 16

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.70, 0.20),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.10, 0.25, 0.95),
    "purple": (0.55, 0.15, 0.75),
    "pink": (1.00, 0.50, 0.75),
    "white": (0.97, 0.97, 0.97),
    "black": (0.05, 0.05, 0.05),
}
COLOR_NAMES = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "ring", "diamond", "hbar", "vbar")
SHAPE_WORDS = {"circle": "circle", "square": "square", "triangle": "triangle", "ring": "ring",
               "diamond": "diamond", "hbar": "stripe", "vbar": "pillar"}

FILLER = tuple("""
vintage modern quiet bright misty golden rainy sunny winter summer autumn spring morning evening night
harbor garden village market station bridge tower castle meadow valley canyon island desert forest lake
river ocean beach cliff hill road street alley plaza temple museum library kitchen bedroom studio cafe
portrait poster postcard sketch painting photo print mural collage drawing render snapshot illustration
old new tiny huge calm wild soft sharp warm cold gentle lonely busy empty crowded ancient futuristic
classic rustic elegant simple ornate minimal abstract dreamy gloomy cheerful serene stormy dusty glossy
paper canvas glass stone wood metal silk velvet marble copper silver bronze ivory amber jade coral
cat dog horse bird fox owl deer rabbit whale tiger lion bear wolf eagle swan dragon robot knight queen
sailor farmer dancer poet wizard pilot child family friends stranger crowd traveler
""".split())
# every word the tokenizer must make a single token
VOCAB = tuple(dict.fromkeys(FILLER + COLOR_NAMES + tuple(SHAPE_WORDS.values()) + ("with", "a", "and")))

# seed streams (the second entry of every default_rng seed list)
STREAM_ORDINARY, STREAM_PLANTED, STREAM_SCHEDULE, STREAM_HELDOUT, STREAM_FRESH = 1, 2, 3, 4, 5
STREAM_FILTER_CALIBRATION = 6  # the training-time mitigation arm's calibration captions (audit.lab.train)

MAX_SHAPES = 4


@dataclass(frozen=True)
class DataConfig:
    """The lab's data design, v2 (see docs/lab.md for why each value).

    Planted images come at ``len(tier_weights)`` duplication levels ("tiers") and in two kinds, as
    duplicated web images do in LAION (Webster 2023, "A Reproducible Extraction of Training Images from
    Diffusion Models": "matching" duplicates keep one caption, "template"/re-captioned ones vary it):
    per tier, ``fixed_per_tier`` images always shown with one caption and ``varied_per_tier`` images
    shown each time with one of ``captions_per_varied`` different captions (chosen uniformly).

    Attributes:
        seed: base seed of every stream.
        tier_weights: relative sampling weight of one planted IMAGE of each tier.
        fixed_per_tier: planted images per tier with one fixed caption.
        varied_per_tier: planted images per tier with several different captions.
        captions_per_varied: captions of each varied image.
        batch_size: images per training step.
        planted_per_batch: how many of them are planted draws (the rest are fresh ordinary pairs, each
            seen once).
        cfg_drop: probability that a caption is replaced by the empty prompt (classifier-free guidance).
    """

    seed: int = 20261203
    tier_weights: tuple[int, ...] = (1, 2, 4, 8)
    fixed_per_tier: int = 8
    varied_per_tier: int = 4
    captions_per_varied: int = 4
    batch_size: int = 48
    planted_per_batch: int = 16
    cfg_drop: float = 0.1

    @property
    def ordinary_per_batch(self) -> int:
        """Ordinary (not planted) images in each training batch."""
        return self.batch_size - self.planted_per_batch

    @property
    def n_planted(self) -> int:
        """Planted images (not prompts)."""
        return len(self.tier_weights) * (self.fixed_per_tier + self.varied_per_tier)

    def planted_tiers(self) -> np.ndarray:
        """Tier index (0 = least duplicated) of each planted image, int [n_planted]; images are ordered
        tier by tier, fixed ones first within a tier."""
        return np.arange(self.n_planted) // (self.fixed_per_tier + self.varied_per_tier)

    def planted_kinds(self) -> list[str]:
        """``"fixed"`` or ``"varied"`` per planted image, [n_planted]."""
        per = ["fixed"] * self.fixed_per_tier + ["varied"] * self.varied_per_tier
        return per * len(self.tier_weights)

    def n_captions(self) -> np.ndarray:
        """Number of distinct captions of each planted image, int [n_planted]."""
        return np.asarray([1 if k == "fixed" else self.captions_per_varied for k in self.planted_kinds()])

    def planted_probs(self) -> np.ndarray:
        """Probability of each planted image in one planted draw, float64 [n_planted], sums to 1."""
        w = np.asarray(self.tier_weights, dtype=np.float64)[self.planted_tiers()]
        return w / w.sum()


@dataclass
class Scenes:
    """Scene parameters for N images; shape slots beyond ``n_shapes`` are unused (kind -1).

    Attributes:
        bg: background colours at the two gradient ends, float32 [N, 2, 3] in [0, 1].
        angle: gradient direction, radians, float32 [N].
        kind: shape kind index into :data:`SHAPES`, int64 [N, 4] (-1 = empty slot).
        color: palette index into :data:`COLOR_NAMES`, int64 [N, 4].
        center: (x, y) pixel coordinates of each shape's centre, float32 [N, 4, 2].
        size: shape half-extent in pixels, float32 [N, 4].
    """

    bg: np.ndarray
    angle: np.ndarray
    kind: np.ndarray
    color: np.ndarray
    center: np.ndarray
    size: np.ndarray

    def __len__(self) -> int:
        return len(self.angle)


def sample_scenes(rng: np.random.Generator, n: int) -> Scenes:
    """Draw ``n`` random scenes (2-4 shapes on a gradient background); see :class:`Scenes` for the arrays."""
    bg = rng.uniform(0.0, 1.0, size=(n, 2, 3)).astype(np.float32)
    angle = rng.uniform(0.0, 2 * np.pi, size=n).astype(np.float32)
    n_shapes = rng.integers(2, MAX_SHAPES + 1, size=n)
    kind = rng.integers(0, len(SHAPES), size=(n, MAX_SHAPES))
    kind[np.arange(MAX_SHAPES)[None, :] >= n_shapes[:, None]] = -1
    color = rng.integers(0, len(COLOR_NAMES), size=(n, MAX_SHAPES))
    center = rng.uniform(3.0, IMAGE_SIZE - 3.0, size=(n, MAX_SHAPES, 2)).astype(np.float32)
    size = rng.uniform(2.0, 4.5, size=(n, MAX_SHAPES)).astype(np.float32)
    return Scenes(bg, angle, kind, color, center, size)


def shape_masks(dx: np.ndarray, dy: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Masks of the 7 shape kinds (order of :data:`SHAPES`) at pixel offsets ``dx, dy`` from the centre and
    half-extent ``s`` (pixels; arrays broadcastable to [..., H, W]): bool [7, ...]."""
    r = np.sqrt(dx * dx + dy * dy)
    return np.stack([
        r <= s,  # circle
        np.maximum(np.abs(dx), np.abs(dy)) <= s * 0.85,  # square
        (dy >= -s) & (dy <= s * 0.8) & (np.abs(dx) <= (dy + s) * 0.6),  # triangle, apex up
        (r <= s) & (r >= s * 0.5),  # ring
        np.abs(dx) + np.abs(dy) <= s * 1.15,  # diamond
        (np.abs(dy) <= np.maximum(s * 0.35, 0.9)) & (np.abs(dx) <= s * 1.5),  # horizontal bar
        (np.abs(dx) <= np.maximum(s * 0.35, 0.9)) & (np.abs(dy) <= s * 1.5),  # vertical bar
    ])


def render(scenes: Scenes) -> np.ndarray:
    """Render scenes to images, float32 [N, 3, 16, 16] with values in [-1, 1].

    The background is a linear gradient between ``bg[:, 0]`` and ``bg[:, 1]`` along ``angle``; shapes are
    hard-edged masks on the pixel-centre grid, painted in slot order (later slots on top).
    """
    n = len(scenes)
    coords = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")  # [H, W]
    # gradient position in [0, 1] along the direction through the image centre
    u = ((xx - IMAGE_SIZE / 2)[None] * np.cos(scenes.angle)[:, None, None]
         + (yy - IMAGE_SIZE / 2)[None] * np.sin(scenes.angle)[:, None, None]) / IMAGE_SIZE + 0.5
    u = np.clip(u, 0.0, 1.0)[:, None]  # [N, 1, H, W]
    img = scenes.bg[:, 0, :, None, None] * (1 - u) + scenes.bg[:, 1, :, None, None] * u  # [N, 3, H, W]
    palette = np.asarray([PALETTE[c] for c in COLOR_NAMES], dtype=np.float32)
    for slot in range(MAX_SHAPES):
        k = scenes.kind[:, slot]
        dx = xx[None] - scenes.center[:, slot, 0, None, None]
        dy = yy[None] - scenes.center[:, slot, 1, None, None]
        s = scenes.size[:, slot, None, None]
        masks = shape_masks(dx, dy, s)  # [7, N, H, W]
        mask = masks[np.clip(k, 0, None), np.arange(n)] & (k >= 0)[:, None, None]  # [N, H, W]
        col = palette[scenes.color[:, slot]]  # [N, 3]
        img = np.where(mask[:, None], col[:, :, None, None], img)
    return (img * 2.0 - 1.0).astype(np.float32)


def caption(rng: np.random.Generator, scenes: Scenes) -> list[str]:
    """One under-determined caption per scene: 1-2 of its shapes by colour and kind, among 1-5 filler words."""
    out = []
    for i in range(len(scenes)):
        present = np.flatnonzero(scenes.kind[i] >= 0)
        n_named = int(rng.integers(1, min(2, len(present)) + 1))
        named = rng.choice(present, size=n_named, replace=False)
        parts = [f"a {COLOR_NAMES[scenes.color[i, j]]} {SHAPE_WORDS[SHAPES[scenes.kind[i, j]]]}" for j in named]
        before = " ".join(rng.choice(FILLER, size=int(rng.integers(1, 4))))
        after = " ".join(rng.choice(FILLER, size=int(rng.integers(0, 3))))
        text = f"{before} with {' and '.join(parts)}"
        out.append(f"{text}, {after}" if after else text)
    return out


def take(scenes: Scenes, index) -> Scenes:
    """The scenes at ``index`` (an int array or slice)."""
    return Scenes(*(getattr(scenes, f)[index] for f in ("bg", "angle", "kind", "color", "center", "size")))


def concat(parts: list[Scenes]) -> Scenes:
    """Concatenate scene sets along N."""
    return Scenes(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                    ("bg", "angle", "kind", "color", "center", "size")))


def planted(config: DataConfig) -> tuple[Scenes, list[list[str]]]:
    """The planted images and their captions, drawn from their own stream.

    Returns ``(scenes, captions)``: ``n_planted`` scenes and, per image, its list of captions (one for a
    fixed image, ``captions_per_varied`` for a varied one). Every caption of every image is distinct
    (re-drawn on a collision), so a planted caption identifies its image.
    """
    rng = np.random.default_rng([config.seed, STREAM_PLANTED])
    scenes = sample_scenes(rng, config.n_planted)
    seen: set[str] = set()
    caps: list[list[str]] = []
    for i, n in enumerate(config.n_captions()):
        one = take(scenes, np.asarray([i]))
        mine: list[str] = []
        while len(mine) < n:
            c = caption(rng, one)[0]
            if c not in seen:
                seen.add(c)
                mine.append(c)
        caps.append(mine)
    return scenes, caps


def ordinary_step(config: DataConfig, step: int) -> tuple[Scenes, list[str]]:
    """The fresh ordinary pairs of training step ``step``: ``ordinary_per_batch`` scenes and captions."""
    rng = np.random.default_rng([config.seed, STREAM_ORDINARY, step])
    scenes = sample_scenes(rng, config.ordinary_per_batch)
    return scenes, caption(rng, scenes)


def planted_step(config: DataConfig, step: int) -> tuple[np.ndarray, np.ndarray]:
    """The planted draws of training step ``step``: ``(image index, caption index)``, each int64
    [planted_per_batch] (images with repeats; the caption index is 0 for fixed images, uniform over the
    image's captions for varied ones)."""
    rng = np.random.default_rng([config.seed, STREAM_PLANTED, step])
    idx = rng.choice(config.n_planted, size=config.planted_per_batch, p=config.planted_probs())
    cap = rng.integers(0, 1 << 30, size=config.planted_per_batch) % config.n_captions()[idx]
    return idx, cap


def cfg_drop_mask(config: DataConfig, step: int) -> np.ndarray:
    """Which captions of step ``step`` are replaced by the empty prompt, bool [batch_size]."""
    rng = np.random.default_rng([config.seed, STREAM_SCHEDULE, step])
    return rng.random(config.batch_size) < config.cfg_drop


def training_batch(config: DataConfig, step: int, planted_pairs=None) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The batch of training step ``step``, a pure function of (config, step).

    Returns:
        images: float32 [batch_size, 3, 16, 16] in [-1, 1] (planted first, then ordinary);
        captions: list of batch_size strings ("" where dropped for classifier-free guidance);
        planted_index: int64 [batch_size], the planted image of each row or -1 for ordinary rows.
    """
    p_scenes, p_caps = planted_pairs if planted_pairs is not None else planted(config)
    idx, cap = planted_step(config, step)
    o_scenes, o_caps = ordinary_step(config, step)
    images = np.concatenate([render(take(p_scenes, idx)), render(o_scenes)])
    caps = [p_caps[i][j] for i, j in zip(idx, cap)] + o_caps
    drop = cfg_drop_mask(config, step)
    caps = ["" if d else c for c, d in zip(caps, drop)]
    planted_index = np.concatenate([idx, np.full(config.ordinary_per_batch, -1)])
    return images, caps, planted_index


def duplication_counts(config: DataConfig, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """How often each planted image, and each of its captions, was shown in steps ``0..steps-1``
    (captions dropped for guidance included): ``(per image int64 [n_planted], per caption int64
    [n_planted, max captions])``."""
    img = np.zeros(config.n_planted, dtype=np.int64)
    cap = np.zeros((config.n_planted, int(config.n_captions().max())), dtype=np.int64)
    for s in range(steps):
        i, j = planted_step(config, s)
        np.add.at(img, i, 1)
        np.add.at(cap, (i, j), 1)
    return img, cap


def fresh_pairs(config: DataConfig, n: int, stream: int = STREAM_HELDOUT) -> tuple[Scenes, list[str]]:
    """``n`` new pairs from a stream never used in training (held-out prompts, or the chance baseline)."""
    rng = np.random.default_rng([config.seed, stream])
    scenes = sample_scenes(rng, n)
    return scenes, caption(rng, scenes)
