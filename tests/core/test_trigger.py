"""core.trigger: the pixel spread, the shared-patch ratio, the shared region and the transplant."""

from __future__ import annotations

import numpy as np
import pytest

from aabl_cli.core.trigger import REFERENCE_SPREAD_MIN, shared_patch, shared_region, spread_map, transplant


def _noise(n: int, seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _stamp(images: np.ndarray, row: int, col: int, value: int = 255, side: int = 3) -> np.ndarray:
    out = images.copy()
    out[:, row:row + side, col:col + side] = value
    return out


def test_spread_map_is_the_windowed_channel_mean_std():
    images = _noise(20, 0, size=8)
    spread = spread_map(images, window=3)
    assert spread.shape == (6, 6)
    expected = (images / 255.0).std(axis=0).mean(axis=-1)[2:5, 1:4].mean()
    assert spread[2, 1] == pytest.approx(expected, rel=1e-5)
    assert np.all(spread_map(np.repeat(images[:1], 5, axis=0)) == 0)  # identical images do not vary


def test_a_stamped_patch_has_ratio_zero_where_it_is():
    core, reference = _stamp(_noise(30, 1), 12, 10), _noise(60, 2)
    found = shared_patch(core, reference)
    assert found["ratio"] == pytest.approx(0.0, abs=1e-6)
    assert found["at"] == [12, 10] and found["window"] == 3
    assert found["core_spread"] == pytest.approx(0.0, abs=1e-6) and found["reference_spread"] > 0.2


def test_images_without_a_shared_region_have_ratio_near_one():
    found = shared_patch(_noise(40, 3), _noise(80, 4))
    assert 0.6 < found["ratio"] <= 1.0


def test_regions_constant_in_the_reference_too_are_left_out():
    """A black border every image of the class has is no trigger: it cannot stand out."""
    core, reference = _noise(30, 5), _noise(60, 6)
    core[:, :, :4] = 0
    reference[:, :, :4] = 0
    found = shared_patch(core, reference)
    assert found["at"][1] >= 2 and found["ratio"] > 0.6  # windows touching the border's inside only
    blank = np.zeros((10, 8, 8, 3), dtype=np.uint8)
    assert shared_patch(blank, blank)["ratio"] is None
    assert REFERENCE_SPREAD_MIN > 0


def test_images_of_different_sizes_are_refused():
    with pytest.raises(ValueError, match="differ in size"):
        shared_patch(_noise(5, 0, size=8), _noise(5, 1, size=16))


def test_shared_region_covers_the_patch_and_its_edge_only():
    core, reference = _stamp(_noise(30, 7), 5, 6), _noise(60, 8)
    mask = shared_region(core, reference, threshold=0.1)
    assert mask[5:8, 6:9].all()  # the stamp itself
    assert mask.sum() <= 5 * 5 and not mask[12:, :].any()  # grown by one pixel, nothing far away
    assert not shared_region(_noise(30, 9), reference, threshold=0.1).any()


def test_transplant_replaces_the_masked_pixels_from_the_donors_only():
    images, donors = _noise(5, 10, size=8), _noise(2, 11, size=8)
    mask = np.zeros((8, 8), dtype=bool)
    mask[1:3, 2:5] = True
    out = transplant(images, donors, mask)
    assert np.array_equal(out[:, ~mask], images[:, ~mask])
    for i in range(5):  # donors are cycled
        assert np.array_equal(out[i][mask], donors[i % 2][mask])
    assert not np.array_equal(images[:, mask], out[:, mask]) and images is not out
