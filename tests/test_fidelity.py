"""FID/KID on tiny images with a small seeded extractor; cached reference features; plots."""

import numpy as np
import pytest
import torch
from helpers import write_images
from PIL import Image

from surgeon.errors import SurgeonError
from surgeon.evaluation.fidelity import extract_features, fid, kid, parse_metrics, reference_features, score


class TinyExtractor(torch.nn.Module):
    """uint8 [N, 3, H, W] → 16 random projections of the 4×4-pooled image; counts the images it sees."""

    def __init__(self):
        super().__init__()
        self.proj = torch.randn(3 * 4 * 4, 16, generator=torch.Generator().manual_seed(0))
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)
        return (pooled @ self.proj,)


def _images(n, seed, shift=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 160, (n, 8, 8, 1), generator=g) + shift
    return x.clamp(0, 255).to(torch.uint8)


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift():
    ex = TinyExtractor()
    a, b, shifted = (extract_features(ex, x) for x in (_images(200, 0), _images(200, 1), _images(200, 1, shift=60)))
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid(a, b) < fid(a, shifted)
    assert fid(a, shifted) > 10 * max(fid(a, b), 1e-3)


def test_kid_has_a_mean_and_a_std_and_ranks_like_fid():
    ex = TinyExtractor()
    a, b, shifted = (extract_features(ex, x) for x in (_images(120, 0), _images(120, 1), _images(120, 1, shift=60)))
    mean, std, size = kid(a, b)
    mean_s, std_s, _ = kid(a, shifted)
    assert size == 120 and std >= 0 and std_s > 0
    assert mean < mean_s
    s = score(a, shifted, "fid,kid")
    assert s.kid_mean == pytest.approx(mean_s) and s.kid_std == pytest.approx(std_s) and s.fid > 0


def test_bad_metric_and_too_few_examples():
    with pytest.raises(SurgeonError, match="unknown metric 'is'"):
        parse_metrics("fid,is")
    one = extract_features(TinyExtractor(), _images(1, 0))
    with pytest.raises(SurgeonError, match="at least 2"):
        fid(one, one)


def _folder(root, n_val, seed=0):
    write_images(root / "train", n=4, seed=seed)
    write_images(root / "validation", n=n_val, seed=seed + 100)
    return root


def test_reference_features_are_cached_and_recomputed_when_data_or_extractor_change(tmp_path, monkeypatch):
    from surgeon.models.presets import build
    from surgeon.tasks import make_task

    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    data = str(_folder(tmp_path / "data", 6))
    task = make_task(build("tiny-unet"), data)
    ex = TinyExtractor()
    first = reference_features(task, data, "tiny", ex, 16)
    assert ex.seen == 6 and first.shape == (6, 16)
    again = reference_features(make_task(build("tiny-unet"), data), data, "tiny", ex, 16)
    assert ex.seen == 6 and torch.equal(first, again)  # from the cache
    reference_features(make_task(build("tiny-unet"), data), data, "other-extractor", ex, 16)
    assert ex.seen == 12
    _folder(tmp_path / "data", 7, seed=1)  # the data changed: one more image, new pixels
    changed = reference_features(make_task(build("tiny-unet"), data), data, "tiny", ex, 16)
    assert ex.seen == 19 and changed.shape == (7, 16)


def test_too_few_heldout_examples(tmp_path, monkeypatch):
    from surgeon.models.presets import build
    from surgeon.tasks import make_task

    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    data = str(_folder(tmp_path / "data", 1))
    with pytest.raises(SurgeonError, match="1 held-out example"):
        reference_features(make_task(build("tiny-unet"), data), data, "tiny", TinyExtractor(), 16)


def test_plots_are_written_and_not_empty(tmp_path):
    import json

    from surgeon.evaluation.plots import grids_side_by_side, loss_curve, metric_vs

    log = tmp_path / "metrics.jsonl"
    log.write_text(
        "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 11))
        + json.dumps({"step": 5, "mask_update": {"regrown": 3}})
        + "\n"
    )
    paths = [
        loss_curve(log, tmp_path / "loss.png", val_loss=0.2),
        grids_side_by_side(
            [("a", np.zeros((20, 20), np.uint8)), ("b", np.full((20, 20, 3), 255, np.uint8))], tmp_path / "grids.png"
        ),
        metric_vs(
            [{"method": "rigl", "s": 0.5, "fid": 3.0}, {"method": "rigl", "s": 0.9, "fid": 5.0}],
            "s",
            "fid",
            tmp_path / "fid.png",
            "S",
            "FID",
            dense=2.0,
        ),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
        with Image.open(p) as im:
            assert im.size[0] > 100 and len(set(im.convert("L").getdata())) > 2  # something drawn


def test_efficientnet_weights_are_read_without_unpickling_and_cached_as_safetensors(tmp_path, monkeypatch):
    import surgeon.io.torchfile
    from surgeon.evaluation.extractors import EFFICIENTNET, EXTRACTORS, load_extractor

    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load unpickles"))
    load_extractor.cache_clear()  # built once per process: start from nothing
    ex = load_extractor(EXTRACTORS[EFFICIENTNET])
    assert len(list((tmp_path / "cache" / "extractors").glob("*.safetensors"))) == 1
    monkeypatch.setattr(surgeon.io.torchfile, "read_state_dict", lambda p: pytest.fail("the cache was not used"))
    load_extractor.cache_clear()
    again = load_extractor(EXTRACTORS[EFFICIENTNET])
    assert again is not ex
    x = _images(6, 0)
    f, g = extract_features(ex, x), extract_features(again, x)
    assert f.shape == (6, 1280) and torch.allclose(f, g)
    assert fid(f, f) == pytest.approx(0.0, abs=1e-4)


def test_fid_equals_torch_fidelitys_own_formula():
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 24, generator=g, dtype=torch.float64)
    b = (
        torch.randn(200, 24, generator=g, dtype=torch.float64)
        @ torch.randn(24, 24, generator=g, dtype=torch.float64)
        * 0.3
        + 0.5
    )
    theirs = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), verbose=False)
    assert fid(a, b) == pytest.approx(theirs[KEY_METRIC_FID], rel=1e-8)


def test_inception_weights_on_disk_are_used_and_read_without_unpickling(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    from surgeon.evaluation.extractors import EXTRACTORS, INCEPTION, load_extractor, resolve_extractor

    # weights as torch-fidelity ships them (a torch.save'd state dict), with recognizable values
    monkeypatch.setattr(inc, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda self, sd, *a, **k: None)
    blank = inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    monkeypatch.undo()
    state = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in blank.state_dict().items()}
    path = tmp_path / "weights-inception.pth"
    torch.save(state, path)
    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SURGEON_INCEPTION_WEIGHTS", str(path))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load unpickles"))
    assert resolve_extractor(None).name == INCEPTION  # the default when the weights are there
    load_extractor.cache_clear()
    model = load_extractor(EXTRACTORS[INCEPTION])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert (
        inc.load_state_dict_from_url is not None and inc.load_state_dict_from_url.__name__ == "load_state_dict_from_url"
    )
    load_extractor.cache_clear()


# --- improved precision and recall (Kynkäänniemi et al. 2019, k = 3) ------------------------------------------


def _knn_precision_recall(gen: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[float, float]:
    """The paper's definition written out: a point is covered when it lies within some other set's point's radius
    (the distance to that point's k-th nearest neighbour in its own set, itself excluded)."""

    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    radius_real = np.sort(dist(real, real), axis=1)[:, k]  # column 0 is the point itself
    radius_gen = np.sort(dist(gen, gen), axis=1)[:, k]
    precision = (dist(gen, real) <= radius_real[None, :]).any(axis=1).mean()
    recall = (dist(real, gen) <= radius_gen[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def test_precision_recall_equal_torch_fidelitys_and_the_definition_on_fixed_features():
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    from surgeon.evaluation.fidelity import precision_recall

    g = torch.Generator().manual_seed(3)
    real = torch.randn(150, 12, generator=g, dtype=torch.float64)
    gen = torch.randn(150, 12, generator=g, dtype=torch.float64) + 0.6  # overlapping, not identical
    p, r, size = precision_recall(gen, real)
    want_p, want_r = _knn_precision_recall(gen.numpy(), real.numpy())
    assert size == 150 and 0.05 < p < 0.95 and 0.05 < r < 0.95  # a case where both numbers are informative
    assert (p, r) == pytest.approx((want_p, want_r), abs=1e-6)
    assert (p, r) == pytest.approx(calculate_precision_recall_part(gen, real, 3, 64), abs=1e-6)  # batched variant
    # unequal sets are cut to the smaller size: the numbers are those of equal-size subsets
    p2, r2, size2 = precision_recall(gen[:100], real)
    assert size2 == 100 and 0.0 <= p2 <= 1.0 and 0.0 <= r2 <= 1.0


def test_copies_of_heldout_data_score_near_one_and_noise_near_zero_precision():
    ex = TinyExtractor()
    heldout = _images(200, 0)
    g = torch.Generator().manual_seed(9)
    copies = (heldout.int() + torch.randint(-2, 3, heldout.shape, generator=g)).clamp(0, 255)
    noise = torch.randint(0, 256, (100, 32, 32, 1), generator=g, dtype=torch.uint8)
    noise = (noise.float() * 0 + 255 * (noise > 250)).to(torch.uint8)  # sparse white speckle on black
    ref = extract_features(ex, heldout)
    s = score(extract_features(ex, copies.to(torch.uint8)), ref, "pr")
    assert s.precision > 0.9 and s.recall > 0.9 and s.pr_size == 200
    assert score(extract_features(ex, noise), ref, "pr").precision < 0.1


def test_precision_recall_need_k_plus_one_examples():
    from surgeon.evaluation.fidelity import precision_recall

    three = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(SurgeonError) as e:
        precision_recall(three, torch.randn(50, 4, dtype=torch.float64))
    assert "at least 4" in e.value.message and "k = 3" in e.value.message and "\n" not in e.value.message
    assert e.value.hint
