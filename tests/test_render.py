"""Rasterizing (x, y, pen) sequences and tiling sample grids."""

import numpy as np
import pytest
import torch
from PIL import Image

from surgeon.data.render import render_grid, render_sequence, split_strokes

SIZE, MARGIN = 32, 0.125  # [-1, 1] maps onto pixels [4, 28]: one unit is 12 pixels


def px(v: float) -> float:
    """Continuous pixel coordinate of a [-1, 1] coordinate (pixel i covers [i, i + 1))."""
    return SIZE * MARGIN + (v + 1) / 2 * SIZE * (1 - 2 * MARGIN)


def draw(points, **kw) -> np.ndarray:
    return render_sequence(np.asarray(points, dtype=np.float32), size=SIZE, margin=MARGIN, **kw)


def test_horizontal_stroke_lights_its_rows_only():
    img = draw([[-0.5, 0.0, 0], [0.5, 0.0, 1]], line_width=2)
    assert img.dtype == np.uint8 and img.shape == (SIZE, SIZE) and img.flags.writeable
    y = px(0.0)  # 16.0: the 2 px line covers rows 15 and 16
    rows = np.flatnonzero(img.max(axis=1))
    assert set(rows) <= {14, 15, 16, 17}  # round caps may touch the neighbouring rows at the ends
    inner = slice(int(px(-0.3)), int(px(0.3)))
    assert (img[int(y) - 1, inner] == 255).all() and (img[int(y), inner] == 255).all()
    assert (img[: int(y) - 2] == 0).all() and (img[int(y) + 2 :] == 0).all()
    cols = np.flatnonzero(img.max(axis=0))
    assert cols.min() >= int(px(-0.5)) - 1 and cols.max() <= int(px(0.5))


def test_y_grows_downwards():
    top = draw([[-0.5, -0.8, 0], [0.5, -0.8, 1]], line_width=2)
    rows = np.flatnonzero(top.max(axis=1))
    assert rows.max() < SIZE // 2


def test_pen_up_leaves_a_dark_gap_between_strokes():
    img = draw([[-1.0, 0.0, 0], [-0.3, 0.0, 1], [0.3, 0.0, 0], [1.0, 0.0, 1]], line_width=2)
    row = img[int(px(0.0))]
    gap = slice(int(px(-0.3)) + 2, int(px(0.3)) - 1)
    assert (row[gap] == 0).all()
    assert row[int(px(-0.6))] == 255 and row[int(px(0.6))] == 255


def test_without_pen_up_the_same_points_are_connected():
    img = draw([[-1.0, 0.0, 0], [-0.3, 0.0, 0], [0.3, 0.0, 0], [1.0, 0.0, 1]], line_width=2)
    assert img[int(px(0.0)), int(px(0.0))] == 255


def test_a_one_point_stroke_is_a_dot_and_line_width_scales_the_ink():
    dot = draw([[0.0, 0.0, 1]], line_width=4)
    assert dot[16, 16] == 255 and dot.sum() > 0
    thin = draw([[-0.5, 0.5, 0], [0.5, -0.5, 1]], line_width=1.5).astype(int).sum()
    thick = draw([[-0.5, 0.5, 0], [0.5, -0.5, 1]], line_width=4).astype(int).sum()
    assert thick > 2 * thin


def test_accepts_tensors_and_rejects_bad_shapes():
    seq = torch.tensor([[-0.5, 0.0, 0.0], [0.5, 0.0, 1.0]])
    np.testing.assert_array_equal(render_sequence(seq, 16), render_sequence(seq.numpy(), 16))
    with pytest.raises(ValueError, match=r"\[L, 3\]"):
        render_sequence(np.zeros((4, 2)))


def test_split_strokes_breaks_after_each_pen_up():
    seq = np.array([[0, 0, 0], [1, 0, 1], [2, 0, 1], [3, 0, 0], [4, 0, 0]], dtype=np.float32)
    parts = split_strokes(seq)
    assert [len(p) for p in parts] == [2, 1, 2]  # a missing final pen-up still ends the last stroke
    np.testing.assert_array_equal(parts[2][:, 0], [3, 4])


def test_grid_places_each_image_in_its_cell():
    images = np.stack([np.full((4, 5), 10 * (i + 1), dtype=np.uint8) for i in range(5)])
    grid = render_grid(images, nrow=3, padding=1)
    assert isinstance(grid, Image.Image) and grid.mode == "L"
    arr = np.asarray(grid)
    assert arr.shape == (2 * (4 + 1) + 1, 3 * (5 + 1) + 1)
    for i in range(5):
        r, c = divmod(i, 3)
        top, left = 1 + r * 5, 1 + c * 6
        assert (arr[top : top + 4, left : left + 5] == 10 * (i + 1)).all()
    assert (arr[6:10, 13:18] == 0).all()  # the empty sixth cell stays background
    assert (arr[0] == 0).all() and (arr[:, 0] == 0).all()


def test_grid_colour_and_errors():
    rgb = torch.zeros(2, 3, 3, 3, dtype=torch.uint8)
    rgb[1, ..., 2] = 200
    grid = render_grid(rgb, nrow=8)
    assert grid.mode == "RGB" and grid.size == (2 * (3 + 2) + 2, 3 + 2 * 2)
    assert np.asarray(grid)[2, 7].tolist() == [0, 0, 200]
    with pytest.raises(ValueError, match="uint8"):
        render_grid(np.zeros((2, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="C in"):
        render_grid(np.zeros((2, 4, 4, 2), dtype=np.uint8))
