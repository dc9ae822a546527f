"""KanjiVG as training data: stroke sequences for ChiroDiff and rendered glyphs for a UNet.

The SVGs come from the pip package ``kanjivg`` (CC BY-SA 3.0). Nothing derived from them is ever written into
the repository: parsed strokes and rendered glyphs go to the user cache directory (``surgeon.data.cache``).

A character becomes a float32 sequence ``[L, 3]`` of (x, y, pen):

1. every ``<path>`` under the StrokePaths group, in document order (= stroke order), is one stroke;
2. each stroke is resampled along its arc length every ``spacing`` units of KanjiVG's 109 x 109 canvas
   (evenly, so that both end points are kept; a tiny stroke keeps its two end points);
3. the whole character is centred on its bounding box and scaled so that its longer side spans [-1, 1]
   (aspect kept; y grows downwards, as in the SVG and in images);
4. pen = 1 on the last point of each stroke, else 0. Characters longer than ``max_points`` are dropped.

Splits are deterministic: base characters are ordered by a hash of (seed, file name), the first
``val_fraction`` of that order is "validation", the rest "train"; ``limit`` keeps the first N characters of a
split in that order. A character's place in the order depends only on the seed and its file name, so changing
``limit``, ``spacing`` or ``max_points`` never moves a character from one split to the other.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from surgeon.data.cache import cache_dir, cache_key, load_cached, save_cached
from surgeon.data.render import default_line_width, render_sequence
from surgeon.data.splits import canonical_split
from surgeon.data.svgpath import parse_paths
from surgeon.errors import SurgeonError

__all__ = [
    "KanjiVGGlyphs",
    "KanjiVGStrokes",
    "StrokeParams",
    "character_sequence",
    "collate_sequences",
    "kanjivg_files",
    "read_strokes",
    "resample_strokes",
]

FORMAT_VERSION = 1  # bump whenever the preprocessing changes what ends up in the cache
SAMPLES_PER_CURVE = 16
# 6 canvas units (of 109) keeps 96% of the base characters within 128 points (median 89); 5.5 would keep 91%.
DEFAULT_SPACING = 6.0
DEFAULT_MAX_POINTS = 128
_SVG = "{http://www.w3.org/2000/svg}"


def find_distribution() -> importlib.metadata.Distribution | None:
    """The installed ``kanjivg`` distribution, or None (tests monkeypatch this to simulate its absence)."""
    try:
        return importlib.metadata.distribution("kanjivg")
    except importlib.metadata.PackageNotFoundError:
        return None


def _require_distribution() -> importlib.metadata.Distribution:
    dist = find_distribution()
    if dist is None:
        raise SurgeonError("the KanjiVG data needs the pip package `kanjivg`", "pip install kanjivg")
    return dist


def kanjivg_files() -> list[Path]:
    """The base-character SVGs of the installed package, sorted; variants such as ``04e00-Kaisho.svg`` are skipped."""
    dist = _require_distribution()
    # The package installs its SVGs as a plain kanji/ folder: listing it is cheaper than parsing the RECORD.
    folder = Path(dist.locate_file("kanji"))
    names = sorted(n for n in os.listdir(folder) if n.endswith(".svg") and "-" not in n) if folder.is_dir() else []
    files = [folder / n for n in names]
    if not files:
        raise SurgeonError(
            f"the installed `kanjivg` {dist.version} ships no kanji/*.svg files",
            "reinstall it: pip install --force-reinstall kanjivg",
        )
    return files


def read_strokes(svg: str | Path) -> list[np.ndarray]:
    """The strokes of one KanjiVG file in stroke order, each ``[K, 2]`` in canvas units (densely sampled)."""
    root = ET.parse(svg).getroot()
    group = next((g for g in root.iter(f"{_SVG}g") if g.get("id", "").startswith("kvg:StrokePaths")), None)
    if group is None:
        raise SurgeonError(f"{svg} has no StrokePaths group", "is this a KanjiVG file?")
    ds = [p.get("d", "") for p in group.iter(f"{_SVG}path")]
    # A path with several subpaths lifts the pen between them, so each subpath counts as a stroke.
    return [sub for path in parse_paths(ds, SAMPLES_PER_CURVE) for sub in path]


def resample_strokes(strokes: list[np.ndarray], spacing: float) -> list[np.ndarray]:
    """Resample each stroke at even arc-length steps of about ``spacing``, keeping both end points."""
    if spacing <= 0:
        raise ValueError(f"spacing must be > 0, got {spacing}")
    counts = np.array([len(s) for s in strokes])
    pts = np.concatenate(strokes)  # [N, 2], all strokes of the character: one vectorized pass
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    # A unit gap between strokes keeps the arc coordinate strictly increasing across stroke boundaries.
    seg[np.cumsum(counts)[:-1] - 1] = 1.0
    arc = np.concatenate([[0.0], np.cumsum(seg)])  # [N]
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    start, length = arc[first], arc[first + counts - 1] - arc[first]
    n = np.maximum(1, np.rint(length / spacing)).astype(np.int64)  # segments per stroke
    stroke = np.repeat(np.arange(len(strokes)), n + 1)
    step = np.arange(len(stroke)) - np.repeat(np.concatenate([[0], np.cumsum(n + 1)[:-1]]), n + 1)
    at = start[stroke] + length[stroke] * step / n[stroke]
    out = np.stack([np.interp(at, arc, pts[:, 0]), np.interp(at, arc, pts[:, 1])], axis=1)
    return np.split(out, np.cumsum(n + 1)[:-1])


def character_sequence(strokes: list[np.ndarray], spacing: float) -> np.ndarray:
    """Strokes in canvas units → normalized float32 ``[L, 3]`` (x, y, pen) sequence (see the module docstring)."""
    strokes = resample_strokes(strokes, spacing)
    xy = np.concatenate(strokes)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    half = max((hi - lo).max() / 2, 1e-6)  # a single dot would otherwise divide by zero
    pen = np.zeros(len(xy))
    pen[np.cumsum([len(s) for s in strokes]) - 1] = 1.0
    return np.column_stack([(xy - (lo + hi) / 2) / half, pen]).astype(np.float32)


@dataclass(frozen=True)
class StrokeParams:
    """Everything that decides the content of a stroke cache file."""

    spacing: float = DEFAULT_SPACING
    max_points: int = DEFAULT_MAX_POINTS
    seed: int = 0
    val_fraction: float = 0.1
    limit: int | None = None

    def validate(self) -> None:
        if self.spacing <= 0:
            raise SurgeonError(
                f"stroke spacing must be > 0, got {self.spacing}",
                f"try {DEFAULT_SPACING} (units of KanjiVG's 109-unit canvas)",
            )
        if self.max_points < 2:
            raise SurgeonError(f"max_points must be >= 2, got {self.max_points}", f"try {DEFAULT_MAX_POINTS}")
        if not 0 < self.val_fraction < 1:
            raise SurgeonError(f"val_fraction must be in (0, 1), got {self.val_fraction}", "try 0.1")
        if self.limit is not None and self.limit < 1:
            raise SurgeonError(
                f"limit must be a positive number of characters, got {self.limit}",
                "leave it unset to use every character",
            )


def split_files(files: list[Path], split: str, seed: int, val_fraction: float) -> list[Path]:
    """The files of ``split`` in their deterministic order (see the module docstring)."""
    order = sorted(files, key=lambda f: hashlib.sha256(f"{seed}:{f.name}".encode()).digest())
    n_val = max(1, round(len(order) * val_fraction))
    return order[:n_val] if canonical_split(split) == "validation" else order[n_val:]


def _build_split(split: str, params: StrokeParams) -> tuple[dict[str, torch.Tensor], int]:
    seqs: list[np.ndarray] = []
    codes: list[int] = []
    dropped = 0
    for f in split_files(kanjivg_files(), split, params.seed, params.val_fraction):
        if params.limit is not None and len(seqs) >= params.limit:
            break
        strokes = read_strokes(f)
        if not strokes:
            continue
        seq = character_sequence(strokes, params.spacing)
        if len(seq) > params.max_points:
            dropped += 1
            continue
        seqs.append(seq)
        codes.append(int(f.stem, 16))  # KanjiVG names files by the hex code point
    if not seqs:
        raise SurgeonError(
            f"no KanjiVG character of the {split} split fits in {params.max_points} points",
            "raise max_points or the stroke spacing",
        )
    tensors = {
        "points": torch.from_numpy(np.concatenate(seqs)),  # [N, 3]
        "offsets": torch.from_numpy(np.cumsum([0] + [len(s) for s in seqs])).to(torch.int64),  # [C + 1]
        "codepoints": torch.tensor(codes, dtype=torch.int64),  # [C]
    }
    return tensors, dropped


def load_stroke_split(split: str, params: StrokeParams) -> dict:
    """``points [N, 3]``, ``offsets [C + 1]``, ``codepoints [C]`` and ``_meta`` of one split; built once, cached."""
    split = canonical_split(split)
    params.validate()
    header = {
        "format": "surgeon.kanjivg.strokes",
        "version": FORMAT_VERSION,
        "kanjivg": _require_distribution().version,
        "split": split,
        "params": asdict(params),
    }
    path = cache_dir("kanjivg") / f"strokes-{split}-{cache_key(header)}.safetensors"
    data = load_cached(path, header)
    if data is None:
        tensors, dropped = _build_split(split, params)
        meta = header | {"count": len(tensors["codepoints"]), "dropped_too_long": dropped}
        save_cached(path, tensors, meta)
        data = tensors | {"_meta": meta}
    return data


class KanjiVGStrokes(Dataset):
    """KanjiVG characters as float32 ``[L, 3]`` (x, y, pen) sequences; batch them with ``collate_sequences``."""

    def __init__(
        self,
        split: str = "train",
        *,
        limit: int | None = None,
        max_points: int = DEFAULT_MAX_POINTS,
        spacing: float = DEFAULT_SPACING,
        seed: int = 0,
        val_fraction: float = 0.1,
    ):
        self.split = canonical_split(split)
        self.params = StrokeParams(
            spacing=spacing, max_points=max_points, seed=seed, val_fraction=val_fraction, limit=limit
        )
        data = load_stroke_split(self.split, self.params)
        self.points, self.offsets, self.codepoints = data["points"], data["offsets"], data["codepoints"]
        self.dropped_too_long = int(data["_meta"]["dropped_too_long"])

    def __len__(self) -> int:
        return len(self.codepoints)

    def __getitem__(self, i: int) -> torch.Tensor:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} characters")
        i %= n
        return self.points[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> torch.Tensor:
        """Points per character ``[C]`` (samplers draw sequence lengths from it)."""
        return self.offsets[1:] - self.offsets[:-1]

    def character(self, i: int) -> str:
        """The Unicode character behind item ``i``."""
        return chr(int(self.codepoints[i]))

    def __repr__(self) -> str:
        return (
            f"KanjiVGStrokes(split={self.split!r}, characters={len(self)}, "
            f"dropped_too_long={self.dropped_too_long}, {self.params})"
        )


def collate_sequences(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero-pad ``[L_i, 3]`` sequences to ``points [B, Lmax, 3]`` with ``mask [B, Lmax]`` (True = real point)."""
    if not items:
        raise ValueError("collate_sequences needs at least one sequence")
    lmax = max(len(s) for s in items)
    points = torch.zeros(len(items), lmax, items[0].shape[-1], dtype=torch.float32)
    mask = torch.zeros(len(items), lmax, dtype=torch.bool)
    for b, s in enumerate(items):
        points[b, : len(s)] = s
        mask[b, : len(s)] = True
    return {"points": points, "mask": mask}


class KanjiVGGlyphs(Dataset):
    """KanjiVG characters rendered as float ``[C, size, size]`` images in [-1, 1] (ink +1 on background -1).

    Rendered once from ``KanjiVGStrokes`` (same split, limit and stroke parameters) and cached as a uint8 stack.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 64,
        channels: int = 1,
        *,
        limit: int | None = None,
        line_width: float | None = None,
        max_points: int = DEFAULT_MAX_POINTS,
        spacing: float = DEFAULT_SPACING,
        seed: int = 0,
        val_fraction: float = 0.1,
    ):
        if channels not in (1, 3):
            raise SurgeonError(f"glyph images have 1 or 3 channels, got {channels}", "use channels=1 (or 3)")
        if size < 8:
            raise SurgeonError(f"glyph size must be at least 8 pixels, got {size}", "try 32 or 64")
        self.split, self.channels = canonical_split(split), channels
        params = StrokeParams(spacing=spacing, max_points=max_points, seed=seed, val_fraction=val_fraction, limit=limit)
        params.validate()
        width = default_line_width(size) if line_width is None else float(line_width)
        header = {
            "format": "surgeon.kanjivg.glyphs",
            "version": FORMAT_VERSION,
            "kanjivg": _require_distribution().version,
            "split": self.split,
            "size": size,
            "line_width": width,
            "strokes": asdict(params),
        }
        path = cache_dir("kanjivg") / f"glyphs-{self.split}-{size}px-{cache_key(header)}.safetensors"
        data = load_cached(path, header)
        if data is None:  # the stroke cache is consulted only when the glyphs must be (re)rendered
            strokes = KanjiVGStrokes(self.split, **asdict(params))
            images = [render_sequence(strokes[i], size=size, line_width=width) for i in range(len(strokes))]
            data = {"images": torch.from_numpy(np.stack(images)), "codepoints": strokes.codepoints.clone()}
            save_cached(path, data, header)
        self.images: torch.Tensor = data["images"]  # uint8 [N, size, size]
        self.codepoints: torch.Tensor = data["codepoints"]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = self.images[i].to(torch.float32).div(127.5).sub(1.0)[None]  # [1, size, size]
        return img.expand(self.channels, -1, -1).contiguous()
