"""The adherence probe: does a generated image show what its caption names? Fixed before training (issue 11).

A lab caption names one or two shapes by colour and kind ("... with a red circle and a blue ring, ...").
For each named (colour, kind), the probe searches every placement of that kind's mask, as the renderer
draws it (:func:`audit.lab.data.shape_masks`): centres on a half-pixel grid over [3, 13] x [3, 13] (the
renderer's range) and half-extents {2.0, 2.5, ..., 4.5} (the renderer's range 2-4.5). A placement FITS when
at least ``FIT_FRACTION`` of its pixels show the named colour, where a pixel shows colour k when, in [0, 1]
RGB, its nearest palette colour is k and lies within ``COLOR_RADIUS`` (Euclidean). The pair is present
when some placement fits; the image ADHERES when every named pair is present.

So the probe asks for a region of the named colour at least as large as the named shape at its smallest
size and covering that shape's outline; it does not tell a circle from a square of the same colour that
contains it. A pixel is assigned to its NEAREST palette colour first, so the radius never makes two
colours claim one pixel; 0.3 tolerates a moderate colour shift of a generation (the two closest palette
colours, orange and yellow, are 0.37 apart).

Two references are reported beside the rate on generations (:func:`probe_references`): the rate on the
true rendered scenes of the captions (the ceiling: occlusion by later shapes can hide a named one) and on
the rendered scenes of OTHER captions (chance).
"""

from __future__ import annotations

import re

import numpy as np

from audit.lab.data import COLOR_NAMES, IMAGE_SIZE, PALETTE, SHAPE_WORDS, SHAPES, shape_masks

FIT_FRACTION = 0.75
COLOR_RADIUS = 0.3
GUIDANCE = 7.5
_WORD_TO_KIND = {w: SHAPES.index(k) for k, w in SHAPE_WORDS.items()}
_PAIR = re.compile(r"\ba (" + "|".join(COLOR_NAMES) + r") (" + "|".join(SHAPE_WORDS.values()) + r")\b")


def named_pairs(caption: str) -> list[tuple[int, int]]:
    """The (palette index, shape kind index) pairs a lab caption names, in order (empty if none)."""
    return [(COLOR_NAMES.index(c), _WORD_TO_KIND[w]) for c, w in _PAIR.findall(caption)]


def _placements() -> np.ndarray:
    """Masks of every placement of every kind: bool [7, P, H*W] (P = 21 x 21 centres x 6 sizes)."""
    coords = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    centres = np.arange(3.0, 13.01, 0.5)
    sizes = np.arange(2.0, 4.51, 0.5)
    cy, cx, s = np.meshgrid(centres, centres, sizes, indexing="ij")
    cx, cy, s = cx.ravel()[:, None, None], cy.ravel()[:, None, None], s.ravel()[:, None, None]
    m = shape_masks(xx[None] - cx, yy[None] - cy, s)  # [7, P, H, W]
    return m.reshape(7, m.shape[1], -1)


_MASKS: np.ndarray | None = None


def color_index(images: np.ndarray) -> np.ndarray:
    """Per pixel: the palette index shown (nearest palette colour within ``COLOR_RADIUS``), else -1.

    ``images``: float [N, 3, H, W] in [-1, 1]. Returns int64 [N, H*W].
    """
    x = (np.asarray(images, np.float32) + 1) / 2
    pal = np.asarray([PALETTE[c] for c in COLOR_NAMES], np.float32)  # [10, 3]
    px = x.reshape(len(x), 3, -1).transpose(0, 2, 1)  # [N, HW, 3]
    d = np.linalg.norm(px[:, :, None, :] - pal[None, None], axis=-1)  # [N, HW, 10]
    k = d.argmin(-1)
    return np.where(d.min(-1) < COLOR_RADIUS, k, -1)


def adheres(images: np.ndarray, captions: list[str]) -> np.ndarray:
    """Whether each image shows every (colour, kind) its caption names: bool [N].

    ``images``: float [N, 3, 16, 16] in [-1, 1]; ``captions``: N lab captions. A caption naming nothing
    counts as not adhering (lab captions always name at least one shape).
    """
    global _MASKS
    if _MASKS is None:
        _MASKS = _placements()
    masks = _MASKS.astype(np.float32)  # [7, P, HW]
    area = masks.sum(-1)  # [7, P]
    col = color_index(images)  # [N, HW]
    out = np.zeros(len(captions), bool)
    for i, cap in enumerate(captions):
        pairs = named_pairs(cap)
        ok = bool(pairs)
        for c, k in pairs:
            hit = (col[i] == c).astype(np.float32)  # [HW]
            frac = masks[k] @ hit / area[k]  # [P]
            ok &= bool((frac >= FIT_FRACTION).any())
        out[i] = ok
    return out


def probe_references(scenes, captions: list[str]) -> dict:
    """The probe on true images: ``{"true_images": rate on each caption's own rendered scene,
    "other_images": rate on the scene of the next caption (cyclic shift; chance)}``."""
    from audit.lab.data import render

    imgs = render(scenes)
    return {"true_images": float(adheres(imgs, captions).mean()),
            "other_images": float(adheres(np.roll(imgs, 1, axis=0), captions).mean())}
