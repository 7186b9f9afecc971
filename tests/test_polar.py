"""segpipe.ops.polar on tiny golden cases: rays, polygons, rasterisation, target assignment."""

from __future__ import annotations

import numpy as np
import pytest

from segpipe.ops import masks as mask_ops
from segpipe.ops import polar


def square(h=32, w=32, x0=8, y0=8, x1=24, y1=24) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def disk(h, w, cx, cy, r) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2) <= r * r).astype(np.uint8)


# --- rays ------------------------------------------------------------------------------------


def test_ray_angles_start_at_plus_x_and_turn_towards_plus_y():
    a = polar.ray_angles(4)
    np.testing.assert_allclose(a, [0, np.pi / 2, np.pi, 3 * np.pi / 2])


def test_ray_distances_of_a_square_from_its_centre():
    # Square covering pixels 8..23: continuous extent [8, 24]; centre (16, 16), half side 8.
    d = polar.ray_distances(square(), np.array([[16.0, 16.0]]), 8)[0]
    assert d.shape == (8,) and d.dtype == np.float32
    np.testing.assert_allclose(d[[0, 2, 4, 6]], 8.0, atol=0.5)  # axis rays hit the sides
    np.testing.assert_allclose(d[[1, 3, 5, 7]], 8.0 * np.sqrt(2), atol=0.75)  # diagonals hit corners


def test_ray_distances_of_a_disk_are_its_radius():
    d = polar.ray_distances(disk(64, 64, 32, 30, 10), np.array([[32.0, 30.0]]), 36)
    np.testing.assert_allclose(d, 10.0, atol=0.6)


def test_ray_distances_off_centre_origin():
    # From (10, 16), inside the square's left part: 14 px to the right side, 2 px to the left side.
    d = polar.ray_distances(square(), np.array([[10.0, 16.0]]), 4)[0]
    np.testing.assert_allclose(d, [14.0, 8.0, 2.0, 8.0], atol=0.5)


def test_ray_takes_the_farthest_crossing():
    # Two bars on the +x ray from the origin: [4, 8) and [12, 16). The ray length is to the far one.
    m = np.zeros((8, 20), np.uint8)
    m[:, 4:8] = 1
    m[:, 12:16] = 1
    d = polar.ray_distances(m, np.array([[0.5, 4.0]]), 4)[0]
    assert d[0] == pytest.approx(15.5, abs=0.5)


def test_ray_that_misses_is_zero_and_empty_origins():
    d = polar.ray_distances(square(), np.array([[2.0, 2.0]]), 4)[0]  # outside, above-left of the square
    assert d[2] == 0 and d[3] == 0  # rays pointing -x and -y meet nothing
    assert polar.ray_distances(square(), np.zeros((0, 2)), 36).shape == (0, 36)


def test_ray_distances_rejects_bad_shapes():
    with pytest.raises(ValueError):
        polar.ray_distances(np.zeros((2, 3, 4)), np.zeros((1, 2)), 4)


def test_mass_centre():
    assert polar.mass_centre(square()) == (16.0, 16.0)
    with pytest.raises(ValueError, match="empty"):
        polar.mass_centre(np.zeros((4, 4)))


def test_polar_centerness():
    assert polar.polar_centerness(np.full((1, 36), 5.0))[0] == pytest.approx(1.0)
    assert polar.polar_centerness(np.array([[1.0, 4.0, 4.0, 4.0]]))[0] == pytest.approx(0.5)


# --- polygons --------------------------------------------------------------------------------


def test_rays_to_polygons_golden():
    p = polar.rays_to_polygons(np.array([[10.0, 20.0]]), np.array([[2.0, 3.0, 4.0, 5.0]]))
    np.testing.assert_allclose(p[0], [[12, 20], [10, 23], [6, 20], [10, 15]], atol=1e-5)


def test_polygon_rasterisation_uses_pixel_corner_coordinates():
    # The polygon (2,2)-(6,6) covers exactly pixels 2..5 in both axes.
    rle = polar.polygons_to_rles(np.array([[[2, 2], [6, 2], [6, 6], [2, 6]]], float), 10, 12)[0]
    m = mask_ops.decode([rle])[0]
    assert rle["size"] == [10, 12] and isinstance(rle["counts"], str)
    assert m.sum() == 16 and m[2:6, 2:6].all()
    assert polar.polygons_to_rles(np.zeros((0, 36, 2)), 10, 12) == []


def test_decode_of_true_rays_recovers_a_disk():
    m = disk(64, 64, 32, 30, 12)
    d = polar.ray_distances(m, np.array([[32.0, 30.0]]), 36)
    rle = polar.polygons_to_rles(polar.rays_to_polygons(np.array([[32.0, 30.0]]), d), 64, 64)
    assert mask_ops.iou(rle, mask_ops.encode(m[None]))[0, 0] > 0.95


def test_polygon_soft_mask_is_coverage_in_the_box_frame():
    poly = np.array([[2, 2], [6, 2], [6, 6], [2, 6]], float)
    sm = polar.polygon_soft_mask(poly, np.array([2, 2, 6, 6]), size=8)
    assert sm.shape == (8, 8) and sm.dtype == np.float32
    assert sm.min() > 0.9  # the polygon is its own box
    half = polar.polygon_soft_mask(poly, np.array([2, 2, 10, 6]), size=8)  # box twice as wide
    assert half[:, :4].mean() > 0.9 and half[:, 4:].max() < 0.1


# --- targets ---------------------------------------------------------------------------------


SHAPES = [(8, 8), (4, 4)]  # a 32x32 image at strides 4 and 8
STRIDES = [4, 8]


def test_level_locations_are_cell_centres():
    xy, lv = polar.level_locations(SHAPES, STRIDES)
    assert xy.shape == (64 + 16, 2) and (lv[:64] == 0).all() and (lv[64:] == 1).all()
    np.testing.assert_allclose(xy[0], [2, 2])
    np.testing.assert_allclose(xy[1], [6, 2])  # row-major: x moves first
    np.testing.assert_allclose(xy[64], [4, 4])


def test_targets_for_one_square():
    # Square pixels 8..23: mass centre (16, 16), longest ray ~11.3 <= 16 -> level 0 (stride 4).
    # Positives: level-0 centres within 1.5*4 = 6 px (per axis) of (16, 16) and inside: x, y in {10, 14, 18, 22}.
    t = polar.polar_targets(square()[None], np.array([3]), SHAPES, STRIDES, size_ranges=[16.0], center_radius=1.5, n_rays=8)
    pos = np.nonzero(t.labels)[0]
    xy, lv = polar.level_locations(SHAPES, STRIDES)
    assert (lv[pos] == 0).all() and len(pos) == 16
    assert set(map(tuple, xy[pos])) == {(x, y) for x in (10, 14, 18, 22) for y in (10, 14, 18, 22)}
    assert (t.labels[pos] == 3).all() and (t.instance[pos] == 0).all()
    i = pos[np.argmin(np.abs(xy[pos] - [14, 14]).sum(1))]  # location (14, 14)
    np.testing.assert_allclose(t.rays[i][[0, 2, 4, 6]], [10, 10, 6, 6], atol=0.5)
    neg = t.labels == 0
    assert (t.rays[neg] == 0).all() and (t.instance[neg] == -1).all()


def test_large_instance_goes_to_the_coarser_level():
    m = square(x0=0, y0=0, x1=32, y1=32)  # longest ray ~22.6 > 16 -> level 1 (stride 8)
    t = polar.polar_targets(m[None], np.array([1]), SHAPES, STRIDES, size_ranges=[16.0], center_radius=1.5, n_rays=8)
    _, lv = polar.level_locations(SHAPES, STRIDES)
    pos = np.nonzero(t.labels)[0]
    assert len(pos) and (lv[pos] == 1).all()


def test_tiny_instance_gets_the_nearest_location():
    m = np.zeros((32, 32), np.uint8)
    m[13, 13] = 1  # one pixel at (13.5, 13.5): no location centre lies inside it
    t = polar.polar_targets(m[None], np.array([1]), SHAPES, STRIDES, size_ranges=[16.0], center_radius=1.5, n_rays=8)
    xy, _ = polar.level_locations(SHAPES, STRIDES)
    pos = np.nonzero(t.labels)[0]
    assert len(pos) == 1 and tuple(xy[pos[0]]) == (14.0, 14.0)


def test_shared_location_goes_to_the_smaller_instance():
    big = square(x0=4, y0=4, x1=28, y1=28)
    small = square(x0=12, y0=12, x1=20, y1=20)
    masks = np.stack([big, small])
    t = polar.polar_targets(masks, np.array([1, 2]), [(8, 8)], [4], size_ranges=[], center_radius=1.5, n_rays=8)
    xy, _ = polar.level_locations([(8, 8)], [4])
    at = lambda x, y: int(np.nonzero((xy == [x, y]).all(1))[0][0])  # noqa: E731
    assert t.instance[at(14, 14)] == 1 and t.labels[at(14, 14)] == 2  # inside both: the small one
    assert t.instance[at(10, 10)] == 0  # inside the big one only
    assert set(t.instance[t.instance >= 0]) == {0, 1}


def test_empty_masks_give_no_positives():
    t = polar.polar_targets(np.zeros((2, 32, 32), np.uint8), np.array([1, 1]), SHAPES, STRIDES,
                            size_ranges=[16.0], center_radius=1.5, n_rays=8)
    assert (t.labels == 0).all() and t.rays.shape == (80, 8)
    t = polar.polar_targets(np.zeros((0, 32, 32), np.uint8), np.zeros(0, np.int64), SHAPES, STRIDES,
                            size_ranges=[16.0], center_radius=1.5, n_rays=8)
    assert (t.labels == 0).all()


def test_ignored_locations_are_those_whose_centre_pixel_is_ignored():
    ignore = np.zeros((16, 16), bool)
    ignore[0:4, 4:8] = True  # holds one location centre: stride 4, cell (0, 1) at x 6, y 2
    shapes, strides = [(4, 4), (2, 2)], [4, 8]
    got = polar.ignored_locations(ignore, shapes, strides)
    xy, _ = polar.level_locations(shapes, strides)
    assert got.shape == (20,) and got.dtype == bool
    assert [tuple(xy[i]) for i in np.nonzero(got)[0]] == [(6.0, 2.0)]
    ignore[4, 4] = True  # the stride-8 cell (0, 0) centres on pixel (x 4, y 4)
    assert [tuple(xy[i]) for i in np.nonzero(polar.ignored_locations(ignore, shapes, strides))[0]] == [(6.0, 2.0), (4.0, 4.0)]
    # a padded feature map reaches past the image: those centres are never ignored
    assert not polar.ignored_locations(np.ones((3, 3), bool), [(1, 1)], [8]).any()
    with pytest.raises(ValueError):
        polar.ignored_locations(np.zeros((2, 3, 3), bool), shapes, strides)
