"""FID, KID and precision/recall through torch-fidelity: features of image sets, cached reference features, the
metrics.

Images are uint8 ``[N, H, W, C]`` (what ``Task.to_images`` returns; C = 1 or 3). The reference set is the
held-out split of the data, rendered the way the model's samples are; its features are cached in the user cache
per (data, resolution, extractor, split), keyed so that a change of the data (file names, sizes, times) or of
the extractor recomputes them. FID, KID and improved precision/recall (Kynkäänniemi et al. 2019, k = 3) are
torch-fidelity's own formulas on those features.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from surgeon.errors import SurgeonError
from surgeon.seeding import generator

METRICS = ("fid", "kid", "pr")
PR_NEIGHBOURS = 3  # k of improved precision/recall: a point's radius is the distance to its k-th nearest neighbour
# a covariance needs two points; a KID subset needs two per side; a k-NN radius needs k other points
MIN_EXAMPLES = {"fid": 2, "kid": 2, "pr": PR_NEIGHBOURS + 1}
KID_SUBSETS = 100  # torch-fidelity's defaults
KID_SUBSET_SIZE = 1000
MAX_REFERENCE = 10_000  # held-out examples used at most (the cost is paid once: the features are cached)


def parse_metrics(metrics) -> tuple[str, ...]:
    items = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    out = tuple(dict.fromkeys(m.strip().lower() for m in items if m.strip()))
    if not out:
        raise SurgeonError("no metric given", f"choose from: {', '.join(METRICS)}")
    for m in out:
        if m not in METRICS:
            raise SurgeonError(f"unknown metric {m!r}", f"choose from: {', '.join(METRICS)}")
    return out


def to_rgb_nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` (C = 1 or 3) → uint8 ``[N, 3, H, W]``, the layout torch-fidelity's extractors take."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] not in (1, 3):
        raise SurgeonError(
            f"samples cannot be scored as images: got {images.dtype} {tuple(images.shape)}",
            "a task's to_images must return uint8 [N, H, W, 1 or 3]",
        )
    x = images.permute(0, 3, 1, 2)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x.contiguous()


@torch.no_grad()
def extract_features(extractor: Callable, images: torch.Tensor, batch_size: int = 64, progress=None) -> torch.Tensor:
    """Features ``[N, D]`` (float64, CPU) of uint8 images ``[N, H, W, C]``; ``extractor`` maps uint8 NCHW → (feats,)."""
    x = to_rgb_nchw(images)
    out = []
    for i in range(0, len(x), batch_size):
        f = extractor(x[i : i + batch_size])
        f = f[0] if isinstance(f, (tuple, list)) else f
        out.append(f.reshape(f.shape[0], -1).double().cpu())
        if progress is not None:
            progress(min(i + batch_size, len(x)))
    return torch.cat(out) if out else torch.empty(0, 0, dtype=torch.float64)


def fid(features_1: torch.Tensor, features_2: torch.Tensor) -> float:
    """Fréchet distance of two feature sets: ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2·tr √(Σ1·Σ2).

    torch-fidelity's statistics (``fid_features_to_statistics``); the trace of the matrix square root is taken as
    Σ √λ of the symmetric PSD matrix √Σ1·Σ2·√Σ1, which has the eigenvalues of Σ1·Σ2. Two symmetric
    eigendecompositions are several times faster than torch-fidelity's general ``eigvals`` of Σ1·Σ2 on 1280-d
    features (a test holds the two equal).
    """
    from torch_fidelity.metric_fid import fid_features_to_statistics

    for f in (features_1, features_2):
        if len(f) < MIN_EXAMPLES["fid"]:
            raise SurgeonError(
                f"FID needs at least {MIN_EXAMPLES['fid']} images per set, got {len(f)}",
                "generate more samples (--n) or give more held-out data",
            )
    s1, s2 = fid_features_to_statistics(features_1.double()), fid_features_to_statistics(features_2.double())
    mu1, sigma1, mu2, sigma2 = (
        np.atleast_1d(s1["mu"]),
        np.atleast_2d(s1["sigma"]),
        np.atleast_1d(s2["mu"]),
        np.atleast_2d(s2["sigma"]),
    )
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    return max(0.0, value)  # round-off can leave a tiny negative value for (near-)identical sets


def kid(
    features_1: torch.Tensor,
    features_2: torch.Tensor,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 2020,
) -> tuple[float, float, int]:
    """KID (polynomial-kernel MMD², unbiased) mean and std over random subsets; returns (mean, std, subset size).

    The subset size is torch-fidelity's 1000 or the smaller set's size when that is smaller.
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(subset_size, len(features_1), len(features_2))
    if size < MIN_EXAMPLES["kid"]:
        raise SurgeonError(
            f"KID needs at least {MIN_EXAMPLES['kid']} images per set, got {size}",
            "generate more samples (--n) or give more held-out data",
        )
    out = kid_features_to_metric(
        features_1.float(),
        features_2.float(),
        kid_subsets=subsets,
        kid_subset_size=size,
        kid_degree=3,
        kid_gamma=None,
        kid_coef0=1,
        rng_seed=seed,
        verbose=False,
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD]), size


def _subset(features: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    if len(features) == size:
        return features
    return features[torch.randperm(len(features), generator=generator(seed))[:size]]


def precision_recall(
    features_1: torch.Tensor, features_2: torch.Tensor, k: int = PR_NEIGHBOURS, seed: int = 2020
) -> tuple[float, float, int]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of samples ``features_1`` against real
    ``features_2``; returns (precision, recall, set size).

    Precision: the fraction of samples inside the real manifold (the union of balls around each real point with
    the radius to its k-th nearest real neighbour); recall: the fraction of real points inside the samples'
    manifold. Both sets are cut to the smaller one's size (a seeded random subset), as the paper compares sets of
    equal size: a larger set has smaller radii, which would bias both numbers. torch-fidelity's own formula.
    """
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    size = min(len(features_1), len(features_2))
    if size < k + 1:
        raise SurgeonError(
            f"precision/recall need at least {k + 1} images per set (k = {k} nearest neighbours), got {size}",
            "generate more samples (--n) or give more held-out data",
        )
    out = prc_features_to_metric(
        _subset(features_1, size, seed).double(),
        _subset(features_2, size, seed + 1).double(),
        prc_neighborhood=k,
        prc_batch_size=10000,
        save_cpu_ram=False,
        verbose=False,
    )
    return float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL]), size


@dataclass
class Scores:
    fid: float | None
    kid_mean: float | None
    kid_std: float | None
    kid_subset_size: int | None
    n_samples: int
    n_reference: int
    precision: float | None = None  # improved precision/recall, k = 3, on pr_size samples and real examples
    recall: float | None = None
    pr_size: int | None = None


def score(features: torch.Tensor, reference: torch.Tensor, metrics=METRICS) -> Scores:
    metrics = parse_metrics(metrics)
    f = fid(features, reference) if "fid" in metrics else None
    km = ks = size = None
    if "kid" in metrics:
        km, ks, size = kid(features, reference)
    p = r = pr_size = None
    if "pr" in metrics:
        p, r, pr_size = precision_recall(features, reference)
    return Scores(f, km, ks, size, len(features), len(reference), p, r, pr_size)


def data_fingerprint(data: str, split: str) -> dict:
    """What the held-out images depend on: the built-in data set's version, or a folder's files (names, sizes,
    modification times), so that editing the folder recomputes cached reference features."""
    from surgeon.data import BUILTIN

    if data == BUILTIN:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("kanjivg")
        except PackageNotFoundError:
            v = "unknown"
        return {"data": BUILTIN, "version": v, "split": split}
    root = Path(data).expanduser().resolve()
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        st = p.stat()
        h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"data": str(root), "files": h.hexdigest()[:16], "split": split}


def heldout_images(task, limit: int = MAX_REFERENCE) -> torch.Tensor:
    """The task's validation split rendered like its samples: uint8 ``[N, H, W, C]``."""
    data = task.dataset("val")
    if data is None or len(data) == 0:
        raise SurgeonError(
            f"{getattr(task, 'data', 'the data')} has no held-out split to compare samples with",
            "give a folder with train/ and validation/ (or val/) subfolders, or use kanjivg",
        )
    n = min(len(data), limit)
    chunks = []
    for i in range(0, n, 256):
        batch = task.collate([data[j] for j in range(i, min(i + 256, n))])
        x = batch["images"] if isinstance(batch, dict) and "images" in batch else batch
        chunks.append(task.to_images(x))
    return torch.cat(chunks)


def reference_features(
    task,
    data: str,
    extractor_name: str,
    extractor: Callable,
    resolution: int,
    metrics=METRICS,
    progress=None,
    limit: int | None = None,
) -> torch.Tensor:
    """Features of the held-out split, from the user cache when (data, resolution, extractor) match."""
    from surgeon.data.cache import cache_dir, cache_key, load_cached, save_cached

    header = {
        "format": "reference-features",
        "version": 1,
        "extractor": extractor_name,
        "resolution": int(resolution),
        "max": MAX_REFERENCE,
        "limit": limit,
        "task": type(task).__name__,
        **data_fingerprint(data, "validation"),
    }
    path = cache_dir("fidelity") / f"reference-{cache_key(header)}.safetensors"
    cached = load_cached(path, header)
    if cached is not None:
        feats = cached["features"]
    else:
        images = heldout_images(task)
        feats = extract_features(extractor, images, progress=progress)
        save_cached(path, {"features": feats.contiguous()}, header)
    need = max(MIN_EXAMPLES[m] for m in parse_metrics(metrics))
    if len(feats) < need:
        raise SurgeonError(
            f"{data} has {len(feats)} held-out example(s); {'/'.join(parse_metrics(metrics)).upper()} "
            f"need(s) at least {need}",
            "add images to the validation/ (or val/) folder",
        )
    return feats
