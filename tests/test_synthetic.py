"""segpipe.data.synthetic: determinism, ground-truth consistency and the COCO file (pycocotools as oracle)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pydantic import ValidationError

from segpipe.data.synthetic import CATEGORIES, SynthSpec, render_scene, write_dataset

SPEC = SynthSpec(n=40, seed=3)  # default 256 x 256 scenes, 3-12 objects
N_SCENES = 36


@pytest.fixture(scope="module")
def scenes():
    return [render_scene(SPEC, i) for i in range(N_SCENES)]


def bbox_max_side(mask: np.ndarray) -> int:
    ys, xs = np.nonzero(mask)
    return int(max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1))


# --- render_scene -------------------------------------------------------------------------------


def test_scene_shapes_and_dtypes(scenes):
    for s in scenes:
        n = len(s.labels)
        assert s.image.shape == (SPEC.height, SPEC.width, 3) and s.image.dtype == np.uint8
        assert s.masks.shape == (n, SPEC.height, SPEC.width) and s.masks.dtype == bool
        assert s.labels.shape == (n,) and s.labels.dtype == np.int64


def test_same_seed_and_index_is_identical(scenes):
    for i in (0, 7):
        again = render_scene(SynthSpec(n=40, seed=3), i)
        np.testing.assert_array_equal(again.image, scenes[i].image)
        np.testing.assert_array_equal(again.masks, scenes[i].masks)
        np.testing.assert_array_equal(again.labels, scenes[i].labels)


def test_no_hidden_state_between_renders(scenes):
    # Rendering other scenes first (or in another order) does not change scene 5.
    render_scene(SPEC, 11)
    render_scene(SynthSpec(seed=99), 0)
    again = render_scene(SPEC, 5)
    np.testing.assert_array_equal(again.image, scenes[5].image)
    np.testing.assert_array_equal(again.masks, scenes[5].masks)


def test_different_seed_or_index_differs(scenes):
    other_seed = render_scene(SynthSpec(n=40, seed=4), 0)
    assert not np.array_equal(other_seed.image, scenes[0].image)
    assert other_seed.masks.shape != scenes[0].masks.shape or not np.array_equal(other_seed.masks, scenes[0].masks)
    assert not np.array_equal(scenes[1].image, scenes[0].image)


def test_n_does_not_change_scene_content(scenes):
    # Scene i is a function of (seed, i) only: the dataset size is not an input.
    again = render_scene(SynthSpec(n=1, seed=3), 2)
    np.testing.assert_array_equal(again.image, scenes[2].image)


def test_every_category_appears(scenes):
    seen = {int(lab) for s in scenes for lab in s.labels}
    assert seen == {c["id"] for c in CATEGORIES}


def test_object_counts_within_spec(scenes):
    for s in scenes:
        # Objects can be dropped (too small, mostly hidden) but never added.
        assert len(s.labels) <= SPEC.max_objects
    assert sum(len(s.labels) for s in scenes) >= N_SCENES * SPEC.min_objects // 2


def test_masks_non_empty(scenes):
    for s in scenes:
        if len(s.labels):
            assert s.masks.reshape(len(s.labels), -1).sum(1).min() >= 6


def test_visible_masks_are_disjoint(scenes):
    for s in scenes:
        if len(s.labels):
            assert s.masks.sum(0).max() <= 1  # every pixel belongs to at most one instance


def test_masks_look_like_objects_in_the_image(scenes):
    # The pixels of an instance differ from the background around it (objects are painted).
    s = scenes[0]
    bg = ~s.masks.any(0)
    assert bg.any()
    for m in s.masks:
        assert m.sum() > 0
    diffs = [np.abs(s.image[m].mean(0) - s.image[bg].mean(0)).max() for m in s.masks]
    assert max(diffs) > 10


def test_object_sizes_span_small_to_large(scenes):
    sides = np.array([bbox_max_side(m) for s in scenes for m in s.masks])
    assert (sides < 16).any(), sides.min()
    assert (sides > 64).any(), sides.max()
    assert sides.max() <= SPEC.largest + 2


def test_no_objects():
    s = render_scene(SynthSpec(n=1, min_objects=0, max_objects=0), 0)
    assert s.masks.shape == (0, SPEC.height, SPEC.width)
    assert s.labels.shape == (0,)
    assert s.image.shape == (SPEC.height, SPEC.width, 3)


def test_non_square_scene():
    s = render_scene(SynthSpec(n=1, height=48, width=96, seed=1), 0)
    assert s.image.shape == (48, 96, 3)
    assert s.masks.shape[1:] == (48, 96)


# --- SynthSpec ----------------------------------------------------------------------------------


def test_spec_rejects_max_objects_below_min():
    with pytest.raises(ValidationError, match="max_objects must be >= min_objects"):
        SynthSpec(min_objects=5, max_objects=4)
    SynthSpec(min_objects=4, max_objects=4)  # equal is fine


def test_spec_rejects_max_size_below_min_size():
    with pytest.raises(ValidationError, match="max_size"):
        SynthSpec(min_size=20, max_size=10)


@pytest.mark.parametrize("field, value", [("n", 0), ("height", 16), ("min_size", 2), ("touching", 1.5), ("bogus", 1)])
def test_spec_bad_values(field, value):
    with pytest.raises(ValidationError) as err:
        SynthSpec.model_validate({field: value})
    assert (field,) in [e["loc"] for e in err.value.errors()]


def test_spec_frozen_and_largest():
    spec = SynthSpec(height=100, width=300)
    assert spec.largest == 50
    assert SynthSpec(max_size=40).largest == 40
    with pytest.raises(ValidationError):
        spec.n = 5


# --- write_dataset ------------------------------------------------------------------------------

SMALL = SynthSpec(n=5, seed=11, height=64, width=80, min_objects=2, max_objects=6, min_size=6)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return write_dataset(SMALL, out)


def test_write_dataset_loads_in_pycocotools(written):
    coco = COCO(str(written))
    assert sorted(coco.getImgIds()) == [1, 2, 3, 4, 5]
    assert sorted(coco.getCatIds()) == [1, 2, 3, 4]
    assert len(coco.getAnnIds()) > 0
    ann_ids = [a["id"] for a in coco.dataset["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)


def test_write_dataset_area_and_bbox_match_masks(written):
    coco = COCO(str(written))
    for ann in coco.dataset["annotations"]:
        img = coco.imgs[ann["image_id"]]
        rle = coco.annToRLE(ann)
        dense = mask_utils.decode(rle)
        assert dense.shape == (img["height"], img["width"])
        assert ann["area"] == int(dense.sum()) > 0
        np.testing.assert_allclose(ann["bbox"], mask_utils.toBbox(rle))
        assert ann["iscrowd"] == 0
        assert ann["category_id"] in {c["id"] for c in CATEGORIES}


def test_write_dataset_annotations_equal_rendered_scenes(written):
    coco = COCO(str(written))
    for i in range(SMALL.n):
        scene = render_scene(SMALL, i)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[i + 1]))
        assert [a["category_id"] for a in anns] == scene.labels.tolist()
        for ann, mask in zip(anns, scene.masks):
            np.testing.assert_array_equal(coco.annToMask(ann), mask.astype(np.uint8))


def test_write_dataset_images_on_disk(written):
    data = json.loads(written.read_text())
    for img in data["images"]:
        path = written.parent / "images" / img["file_name"]
        with Image.open(path) as im:
            assert im.format == "JPEG"
            assert im.size == (img["width"], img["height"]) == (SMALL.width, SMALL.height)
            assert im.mode == "RGB"
    assert data["info"]["spec"]["seed"] == SMALL.seed


def test_write_dataset_is_deterministic(written, tmp_path):
    again = write_dataset(SMALL, tmp_path)
    assert again.read_text() == written.read_text()
    for name in sorted(p.name for p in (written.parent / "images").iterdir()):
        assert (tmp_path / "images" / name).read_bytes() == (written.parent / "images" / name).read_bytes()
