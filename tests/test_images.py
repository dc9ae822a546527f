"""ImageFolder and resolve_image_data on small generated folders."""

import numpy as np
import pytest
import torch
from PIL import Image

from surgeon.data import resolve_image_data
from surgeon.data.images import ImageFolder
from surgeon.errors import SurgeonError


def save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)
    return path


def three_bands():
    """60x20: red [0, 15) | green [15, 45) | blue [45, 60) columns; resize + centre crop keeps only green."""
    img = np.zeros((20, 60, 3), dtype=np.uint8)
    img[:, :15, 0] = 255
    img[:, 15:45, 1] = 255
    img[:, 45:, 2] = 255
    return img


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    save(root / "a.png", three_bands())
    save(root / "sub" / "b.JPG", np.full((30, 30, 3), 128))
    save(root / "sub" / "deeper" / "c.bmp", np.full((8, 12), 50))
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes(b"\x89PNG but not really")
    return root


def test_reads_every_image_recursively_and_skips_the_rest(folder):
    ds = ImageFolder(folder, size=10, channels=3)
    assert sorted(p.name for p in ds.files) == ["a.png", "b.JPG", "c.bmp"]
    for i in range(len(ds)):
        x = ds[i]
        assert x.shape == (3, 10, 10) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1


def test_resize_shorter_side_then_centre_crop(folder):
    ds = ImageFolder(folder, size=10, channels=3)
    x = ds[[p.name for p in ds.files].index("a.png")]
    # 60x20 → 30x10 (green spans columns 7.5-22.5), the centre crop takes columns 10-20
    assert torch.allclose(x[1], torch.ones(10, 10), atol=0.02)
    assert torch.allclose(x[0], -torch.ones(10, 10), atol=0.02) and torch.allclose(x[2], -torch.ones(10, 10), atol=0.02)


def test_grayscale_and_value_mapping(folder):
    ds = ImageFolder(folder / "sub", size=6, channels=1)
    by_name = {p.name: ds[i] for i, p in enumerate(ds.files)}
    assert by_name["c.bmp"].shape == (1, 6, 6)
    assert torch.allclose(by_name["c.bmp"], torch.full((1, 6, 6), 50 / 127.5 - 1), atol=1e-6)
    assert torch.allclose(by_name["b.JPG"], torch.full((1, 6, 6), 128 / 127.5 - 1), atol=0.05)  # JPEG is lossy


def test_transparency_is_flattened_onto_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:4, :, :] = [0, 0, 0, 255]  # opaque black top half, transparent bottom half
    save(tmp_path / "t.png", rgba, None)
    x = ImageFolder(tmp_path, size=8, channels=3)[0]
    assert torch.allclose(x[:, :3], -torch.ones(3, 3, 8)) and torch.allclose(x[:, 5:], torch.ones(3, 3, 8))


def test_limit_takes_a_seeded_subset(folder):
    a = ImageFolder(folder, size=4, channels=3, limit=2, seed=1)
    b = ImageFolder(folder, size=4, channels=3, limit=2, seed=1)
    assert len(a) == 2 and a.files == b.files
    assert set(a.files) <= set(ImageFolder(folder, size=4, channels=3).files)


def test_errors_say_what_is_wrong(tmp_path, folder):
    with pytest.raises(SurgeonError, match="does not exist"):
        ImageFolder(tmp_path / "missing", size=8)
    with pytest.raises(SurgeonError, match="not a folder"):
        ImageFolder(folder / "a.png", size=8)
    empty = tmp_path / "empty"
    (empty / "x").mkdir(parents=True)
    (empty / "x" / "readme.md").write_text("hi")
    with pytest.raises(SurgeonError, match="no images found in") as err:
        ImageFolder(empty, size=8)
    assert ".png" in err.value.hint and ".jpg" in err.value.hint
    with pytest.raises(SurgeonError, match="1 or 3 channels"):
        ImageFolder(folder, size=8, channels=4)


def test_resolve_folder_without_splits_is_training_only(folder):
    train = resolve_image_data(str(folder), size=8, channels=3, split="train")
    assert isinstance(train, ImageFolder) and len(train) == 3
    assert resolve_image_data(str(folder), size=8, channels=3, split="val") is None


def test_resolve_folder_with_split_subfolders(tmp_path):
    save(tmp_path / "train" / "a.png", np.zeros((8, 8, 3)))
    save(tmp_path / "train" / "b.png", np.zeros((8, 8, 3)))
    save(tmp_path / "val" / "c.png", np.zeros((8, 8, 3)))
    train = resolve_image_data(str(tmp_path), size=8, channels=3, split="train")
    val = resolve_image_data(str(tmp_path), size=8, channels=3, split="validation")
    assert [p.name for p in train.files] == ["a.png", "b.png"]
    assert [p.name for p in val.files] == ["c.png"]
    assert len(resolve_image_data(str(tmp_path), size=8, channels=3, limit=1)) == 1


def test_resolve_rejects_unknown_specs_and_splits(tmp_path):
    with pytest.raises(SurgeonError, match="no data set or folder named") as err:
        resolve_image_data("imagenet-9000", size=8, channels=3)
    assert "kanjivg" in err.value.hint
    with pytest.raises(SurgeonError, match="unknown split"):
        resolve_image_data(str(tmp_path), size=8, channels=3, split="test")
    save(tmp_path / "val" / "c.png", np.zeros((8, 8, 3)))
    with pytest.raises(SurgeonError, match="no train/ folder"):
        resolve_image_data(str(tmp_path), size=8, channels=3, split="train")
