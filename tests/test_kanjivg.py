"""KanjiVG strokes and glyphs: parsing, resampling, normalization, splits, cache, and the missing-package error.

Every test points SURGEON_CACHE at its own temporary folder and uses ``limit``, so nothing depends on a warm cache.
"""

import numpy as np
import pytest
import torch

from surgeon.data import cache, kanjivg, resolve_image_data, resolve_sequence_data
from surgeon.data.kanjivg import (
    KanjiVGGlyphs,
    KanjiVGStrokes,
    character_sequence,
    collate_sequences,
    kanjivg_files,
    read_strokes,
    resample_strokes,
)
from surgeon.errors import SurgeonError

# A hand-written file in KanjiVG's layout (not KanjiVG data): nested groups, and a numbers group to ignore.
SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="109" height="109" viewBox="0 0 109 109"
     xmlns:kvg="http://kanjivg.tagaini.net">
<g id="kvg:StrokePaths_0ffff" style="fill:none">
  <g id="kvg:0ffff" kvg:element="x">
    <path id="kvg:0ffff-s1" d="M10,20 L70,20"/>
    <g id="kvg:0ffff-g1">
      <path id="kvg:0ffff-s2" d="M40,10 V50"/>
    </g>
    <path id="kvg:0ffff-s3" d="m20,40 c0,0 10,0 20,0"/>
  </g>
</g>
<g id="kvg:StrokeNumbers_0ffff"><text transform="matrix(1 0 0 1 4 5)">1</text></g>
</svg>
"""


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_read_strokes_in_document_order(tmp_path):
    path = tmp_path / "0ffff.svg"
    path.write_text(SVG)
    s1, s2, s3 = read_strokes(path)
    np.testing.assert_allclose(s1, [[10, 20], [70, 20]])
    np.testing.assert_allclose(s2, [[40, 10], [40, 50]])
    np.testing.assert_allclose(s3[[0, -1]], [[20, 40], [40, 40]])


def test_resampling_keeps_end_points_at_even_spacing():
    line = np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 9.0]])  # an L shape of arc length 19
    tiny = np.array([[5.0, 5.0], [5.2, 5.0]])
    out, dot = resample_strokes([line, tiny], spacing=2.0)
    assert len(out) == round(19 / 2) + 1
    np.testing.assert_allclose(out[[0, -1]], line[[0, -1]])
    steps = np.abs(np.diff(out, axis=0)).sum(axis=1)  # arc length between samples (L1 = L2 on axis-aligned legs)
    np.testing.assert_allclose(steps, 19 / (len(out) - 1), rtol=1e-9)
    np.testing.assert_allclose(dot, tiny)  # shorter than the spacing: just its two end points


def test_character_sequence_normalizes_keeping_aspect_and_marks_stroke_ends():
    strokes = [np.array([[10.0, 20.0], [70.0, 20.0]]), np.array([[40.0, 10.0], [40.0, 40.0]])]
    seq = character_sequence(strokes, spacing=10.0)
    assert seq.dtype == np.float32 and seq.shape == (7 + 4, 3)
    xy = seq[:, :2]
    assert xy[:, 0].min() == pytest.approx(-1) and xy[:, 0].max() == pytest.approx(1)  # the longer side (x, 60)
    assert xy[:, 1].min() == pytest.approx(-0.5) and xy[:, 1].max() == pytest.approx(0.5)  # 30 of 60: half
    assert np.flatnonzero(seq[:, 2]).tolist() == [6, 10]


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kanjivg, "find_distribution", lambda: None)
    for make in (
        lambda: resolve_sequence_data("kanjivg", "train", 4, 128),
        lambda: resolve_image_data("kanjivg", 16, 1, limit=4),
    ):
        with pytest.raises(SurgeonError) as err:
            make()
        assert err.value.message == "the KanjiVG data needs the pip package `kanjivg`"
        assert err.value.hint == "pip install kanjivg"


def test_only_base_characters_are_listed():
    files = kanjivg_files()
    assert list(files[0].parent.glob("*-*.svg")), "the package ships variant files, so the filter is exercised"
    assert all("-" not in f.stem and int(f.stem, 16) > 0 for f in files)
    assert len(files) > 1000 and files == sorted(files)


def test_dataset_items_are_normalized_sequences():
    ds = KanjiVGStrokes("train", limit=6, max_points=128)
    assert len(ds) == 6
    for i in range(len(ds)):
        seq = ds[i]
        assert seq.dtype == torch.float32 and seq.ndim == 2 and seq.shape[1] == 3
        assert 2 <= len(seq) <= 128
        assert seq[:, :2].abs().max() == pytest.approx(1.0, abs=1e-6)
        assert set(seq[:, 2].unique().tolist()) <= {0.0, 1.0} and seq[-1, 2] == 1
    assert ds.lengths.tolist() == [len(ds[i]) for i in range(len(ds))]
    assert len(ds.character(0)) == 1
    with pytest.raises(IndexError):
        ds[6]


def test_splits_are_disjoint_seeded_and_independent_of_limit():
    train = KanjiVGStrokes("train", limit=8)
    val = KanjiVGStrokes("val", limit=8)
    assert val.split == "validation"
    assert not set(train.codepoints.tolist()) & set(val.codepoints.tolist())
    again = KanjiVGStrokes("train", limit=8)
    assert torch.equal(again.codepoints, train.codepoints) and torch.equal(again.points, train.points)
    assert KanjiVGStrokes("train", limit=4).codepoints.tolist() == train.codepoints[:4].tolist()
    other = KanjiVGStrokes("train", limit=8, seed=1)
    assert other.codepoints.tolist() != train.codepoints.tolist()
    with pytest.raises(SurgeonError, match="unknown split"):
        KanjiVGStrokes("test", limit=2)


def test_characters_longer_than_max_points_are_dropped():
    short = KanjiVGStrokes("train", limit=5, max_points=40)
    assert (short.lengths <= 40).all() and len(short) <= 5
    assert short.dropped_too_long > 0  # 40 points at the default spacing is shorter than most characters


def test_second_load_comes_from_the_cache(monkeypatch, tmp_cache):
    first = KanjiVGStrokes("train", limit=3)
    assert len(list(tmp_cache.glob("kanjivg/strokes-*.safetensors"))) == 1

    def no_parsing(*_):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(kanjivg, "read_strokes", no_parsing)
    second = KanjiVGStrokes("train", limit=3)
    assert torch.equal(first.points, second.points)
    with pytest.raises(AssertionError, match="cache"):  # a parameter change must rebuild
        KanjiVGStrokes("train", limit=3, spacing=4.0)


def test_stale_or_corrupt_cache_files_are_rebuilt(monkeypatch, tmp_cache):
    monkeypatch.setattr(kanjivg, "cache_key", lambda header: "same-name-for-every-parameter")
    coarse = KanjiVGStrokes("train", limit=3, spacing=8.0, max_points=1000)
    fine = KanjiVGStrokes("train", limit=3, spacing=4.0, max_points=1000)  # same file name, other header: rebuilt
    assert torch.equal(fine.codepoints, coarse.codepoints) and (fine.lengths > coarse.lengths).all()
    (path,) = tmp_cache.glob("kanjivg/strokes-*.safetensors")
    path.write_bytes(b"truncated")
    assert torch.equal(KanjiVGStrokes("train", limit=3, spacing=4.0, max_points=1000).points, fine.points)


def test_bad_parameters_raise_surgeon_errors():
    with pytest.raises(SurgeonError, match="spacing"):
        KanjiVGStrokes(limit=2, spacing=0)
    with pytest.raises(SurgeonError, match="limit"):
        KanjiVGStrokes(limit=0)
    with pytest.raises(SurgeonError, match="unknown sequence data"):
        resolve_sequence_data("quickdraw", "train", 2, 128)


def test_collate_zero_pads_and_masks():
    a, b = torch.ones(3, 3), torch.full((5, 3), 2.0)
    batch = collate_sequences([a, b])
    assert batch["points"].shape == (2, 5, 3) and batch["mask"].dtype == torch.bool
    assert batch["mask"].sum(1).tolist() == [3, 5]
    assert (batch["points"][0, 3:] == 0).all() and (batch["points"][0, :3] == 1).all()
    assert torch.equal(batch["points"][1], b)


def test_glyphs_are_rendered_cached_images(monkeypatch, tmp_cache):
    glyphs = resolve_image_data("kanjivg", size=16, channels=1, split="train", limit=3)
    assert isinstance(glyphs, KanjiVGGlyphs) and len(glyphs) == 3
    x = glyphs[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1  # black background, white ink
    strokes = KanjiVGStrokes("train", limit=3)
    assert torch.equal(glyphs.codepoints, strokes.codepoints)
    rgb = KanjiVGGlyphs("train", size=16, channels=3, limit=3)
    assert rgb[1].shape == (3, 16, 16) and torch.equal(rgb[1][0], rgb[1][2]) and torch.equal(rgb[1][:1], glyphs[1])

    monkeypatch.setattr(kanjivg, "render_sequence", lambda *a, **k: pytest.fail("glyphs should come from the cache"))
    assert torch.equal(KanjiVGGlyphs("train", size=16, limit=3).images, glyphs.images)
    with pytest.raises(SurgeonError, match="1 or 3 channels"):
        KanjiVGGlyphs("train", size=16, channels=2, limit=3)
