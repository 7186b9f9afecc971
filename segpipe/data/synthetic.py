"""The synthetic shapes domain: COCO-format scenes with exact instance ground truth.

Four categories cover the hard cases of instance masks: ``ellipse`` (convex), ``star``
(non-convex), ``ring`` (a hole) and ``cross`` (thin parts). Scenes have gradient, noisy
backgrounds, textured objects, occlusion (later objects cover earlier ones; ground truth is the
visible part), touching instances, object sizes from ~8 px to half the image, and JPEG compression.
Everything is a pure function of (seed, image index).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from segpipe.config import SynthSpec
from segpipe.ops import masks as mask_ops

CATEGORIES: list[dict] = [
    {"id": 1, "name": "ellipse", "supercategory": "shape"},
    {"id": 2, "name": "star", "supercategory": "shape"},
    {"id": 3, "name": "ring", "supercategory": "shape"},
    {"id": 4, "name": "cross", "supercategory": "shape"},
]


@dataclass(frozen=True)
class Scene:
    """One rendered scene: image uint8 [H, W, 3] and visible instance masks bool [N, H, W]."""

    image: np.ndarray
    masks: np.ndarray
    labels: np.ndarray  # [N] int64 category ids


def render_scene(spec: SynthSpec, index: int) -> Scene:
    """Render image ``index`` of the dataset described by ``spec`` (deterministic)."""
    rng = np.random.default_rng([spec.seed, index])
    h, w = spec.height, spec.width
    canvas = _background(rng, h, w)
    n_obj = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    full_masks: list[np.ndarray] = []
    labels: list[int] = []
    centres: list[tuple[float, float, float]] = []
    for _ in range(n_obj):
        cat = int(rng.integers(1, len(CATEGORIES) + 1))
        diameter = float(np.exp(rng.uniform(np.log(spec.min_size), np.log(spec.largest))))
        cx, cy = _place(rng, h, w, diameter, centres, spec.touching)
        mask = _shape_mask(rng, cat, cx, cy, diameter, h, w)
        if mask.sum() < 4:
            continue
        _paint(rng, canvas, mask)
        full_masks.append(mask)
        labels.append(cat)
        centres.append((cx, cy, diameter / 2))
    visible, kept = _visible(full_masks, spec.min_visible)
    image = _finish(rng, canvas)
    masks = np.stack(visible) if visible else np.zeros((0, h, w), bool)
    return Scene(image=image, masks=masks, labels=np.asarray([labels[i] for i in kept], np.int64))


def ensure_dataset(spec: SynthSpec, out_dir: str | Path, log=None) -> Path:
    """``write_dataset`` unless ``out_dir`` already holds the dataset of this very spec (its
    annotations record the spec). Returns the annotations json path."""
    ann = Path(out_dir) / "annotations.json"
    if ann.is_file() and json.loads(ann.read_text())["info"]["spec"] == spec.model_dump(mode="json"):
        return ann
    if log is not None:
        log(f"generating {spec.n} synthetic shapes images (seed {spec.seed}) in {out_dir}")
    return write_dataset(spec, out_dir)


def write_dataset(spec: SynthSpec, out_dir: str | Path) -> Path:
    """Write ``out_dir/images/*.jpg`` and ``out_dir/annotations.json`` (COCO, RLE). Returns the json path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for i in range(spec.n):
        scene = render_scene(spec, i)
        name = f"{spec.seed:04d}_{i:06d}.jpg"
        encoded = _encode_jpeg(scene.image, _quality(spec, i))
        (out / "images" / name).write_bytes(encoded)
        image_id = i + 1
        images.append({"id": image_id, "file_name": name, "height": spec.height, "width": spec.width})
        rles = mask_ops.encode(scene.masks.astype(np.uint8))
        boxes = mask_ops.to_bbox(rles)
        areas = mask_ops.area(rles)
        for rle, box, ar, lab in zip(rles, boxes, areas, scene.labels):
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": int(lab),
                    "segmentation": rle,
                    "bbox": [float(v) for v in box],
                    "area": int(ar),
                    "iscrowd": 0,
                }
            )
            ann_id += 1
    coco = {
        "info": {"description": "segpipe synthetic shapes", "spec": spec.model_dump(mode="json")},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    path = out / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


# --- rendering helpers (all take the scene's rng) ---------------------------------------------


def _quality(spec: SynthSpec, index: int) -> int:
    rng = np.random.default_rng([spec.seed, index, 7])
    return int(rng.integers(spec.jpeg_quality[0], spec.jpeg_quality[1] + 1))


def _encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _finish(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """Sensor noise; the JPEG round trip happens when written (the image returned is pre-JPEG)."""
    noisy = canvas + rng.normal(0, rng.uniform(2, 8), canvas.shape)
    return noisy.clip(0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A linear colour gradient plus low-frequency blotches, float [H, W, 3] in 0..255."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    bg = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    low = rng.normal(0, 1, (max(h // 32, 2), max(w // 32, 2)))
    low_img = np.asarray(Image.fromarray(low.astype(np.float32)).resize((w, h), Image.BILINEAR))
    return bg + rng.uniform(5, 25) * low_img[..., None]


def _place(rng, h, w, diameter, centres, touching) -> tuple[float, float]:
    """Pick a centre; with probability ``touching`` put the object against an earlier one."""
    r = diameter / 2
    if centres and rng.uniform() < touching:
        ox, oy, orad = centres[int(rng.integers(len(centres)))]
        a = rng.uniform(0, 2 * np.pi)
        d = (orad + r) * rng.uniform(0.8, 1.0)
        cx, cy = ox + d * np.cos(a), oy + d * np.sin(a)
        if 0 <= cx < w and 0 <= cy < h:
            return float(cx), float(cy)
    return float(rng.uniform(r * 0.3, w - r * 0.3)), float(rng.uniform(r * 0.3, h - r * 0.3))


def _polygon_mask(points: np.ndarray, h: int, w: int) -> np.ndarray:
    img = Image.new("L", (w, h), 0)
    ImageDraw.Draw(img).polygon([(float(x), float(y)) for x, y in points], fill=1)
    return np.asarray(img, dtype=bool)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _shape_mask(rng, cat: int, cx: float, cy: float, diameter: float, h: int, w: int) -> np.ndarray:
    r = diameter / 2
    angle = rng.uniform(0, 2 * np.pi)
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    centre = np.array([cx, cy])
    if cat == 1:  # ellipse: convex
        ratio = rng.uniform(0.5, 1.0)
        pts = np.stack([r * np.cos(t), r * ratio * np.sin(t)], 1)
        return _polygon_mask(_rotate(pts, angle) + centre, h, w)
    if cat == 2:  # star: non-convex
        k = int(rng.integers(5, 8))
        inner = rng.uniform(0.35, 0.55)
        a = np.linspace(0, 2 * np.pi, 2 * k, endpoint=False)
        rad = np.where(np.arange(2 * k) % 2 == 0, r, r * inner)
        pts = np.stack([rad * np.cos(a), rad * np.sin(a)], 1)
        return _polygon_mask(_rotate(pts, angle) + centre, h, w)
    if cat == 3:  # ring: a hole
        ratio = rng.uniform(0.7, 1.0)
        hole = rng.uniform(0.4, 0.6)
        outer = np.stack([r * np.cos(t), r * ratio * np.sin(t)], 1)
        m = _polygon_mask(_rotate(outer, angle) + centre, h, w)
        inner = _polygon_mask(_rotate(outer * hole, angle) + centre, h, w)
        return m & ~inner
    # cross: thin arms
    arm = r * rng.uniform(0.14, 0.28)
    bar = np.array([[-r, -arm], [r, -arm], [r, arm], [-r, arm]])
    m1 = _polygon_mask(_rotate(bar, angle) + centre, h, w)
    m2 = _polygon_mask(_rotate(bar, angle + np.pi / 2) + centre, h, w)
    return m1 | m2


def _paint(rng, canvas: np.ndarray, mask: np.ndarray) -> None:
    """Composite a textured fill into ``canvas`` (float [H, W, 3]) under ``mask``, in place."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    region = mask[y0:y1, x0:x1]
    hh, ww = region.shape
    base = rng.uniform(0, 255, 3)
    kind = int(rng.integers(4))
    yy, xx = np.mgrid[0:hh, 0:ww].astype(np.float32)
    if kind == 0:  # flat
        tex = np.zeros((hh, ww), np.float32)
    elif kind == 1:  # stripes
        period = rng.uniform(3, 10)
        a = rng.uniform(0, np.pi)
        tex = np.sin((np.cos(a) * xx + np.sin(a) * yy) * 2 * np.pi / period)
    elif kind == 2:  # checker
        p = int(rng.integers(2, 7))
        tex = (((xx // p) + (yy // p)) % 2) * 2 - 1
    else:  # speckle
        tex = rng.normal(0, 1, (hh, ww))
    amp = rng.uniform(10, 40)
    fill = base[None, None] + amp * tex[..., None] * rng.uniform(0.5, 1.0, 3)[None, None]
    # Shading from one side, to avoid perfectly flat objects.
    shade = 1 + 0.15 * (xx / max(ww, 1) - 0.5) * rng.choice([-1, 1])
    fill = fill * shade[..., None]
    sub = canvas[y0:y1, x0:x1]
    sub[region] = fill[region]


def _visible(full_masks: list[np.ndarray], min_visible: float) -> tuple[list[np.ndarray], list[int]]:
    """Visible part of each mask (minus everything painted later); drop mostly hidden ones."""
    out, kept = [], []
    covered = np.zeros_like(full_masks[0]) if full_masks else None
    vis_rev = []
    for i in range(len(full_masks) - 1, -1, -1):
        m = full_masks[i]
        vis = m & ~covered
        covered |= m
        vis_rev.append((i, vis))
    for i, vis in reversed(vis_rev):
        full = full_masks[i].sum()
        if vis.sum() >= max(min_visible * full, 6):
            out.append(vis)
            kept.append(i)
    return out, kept
