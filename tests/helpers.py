"""Helpers the test modules share: data folders on disk, the command line in-process, and the one check of an
error's shape."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner, Result

from surgeon.io.container import INTEGRITY, record_digest

CATCH_ALL_HINT = "SURGEON_DEBUG"  # the hint of an exception no code named: a refusal a test expects is never it


def write_images(folder: Path, n: int = 16, size: int = 16, seed: int = 0) -> Path:
    """``n`` seeded random grayscale PNGs of ``size``×``size`` in ``folder`` (created); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(folder / f"{i:02d}.png")
    return folder


def invoke(*args, **kwargs) -> Result:
    """The ``surgeon`` command run in-process, e.g. ``invoke("sparsify", "tiny-unet", "--steps", 2)`` (arguments
    pass through ``str``); ``kwargs`` go to ``CliRunner.invoke``."""
    from surgeon.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


def assert_one_error(
    result: Result | subprocess.CompletedProcess, *words: str, hint: Iterable[str] = (), code: int = 1
) -> tuple[str, str]:
    """The one shape of a refusal: exit status ``code``, no traceback, and on stderr exactly two non-empty lines,
    ``error: ...`` holding every one of ``words`` and then ``hint: ...`` holding every one of ``hint`` (its own
    hint, not the catch-all's). ``result`` is an in-process run or a finished subprocess (text mode). Returns the
    two lines."""
    if isinstance(result, subprocess.CompletedProcess):
        exit_code, stderr, output = result.returncode, result.stderr, result.stdout + result.stderr
    else:
        exit_code, stderr, output = result.exit_code, result.stderr, result.output
    assert exit_code == code, output
    assert "Traceback" not in output and "Traceback" not in stderr, output
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 2, stderr
    error, hint_line = lines
    assert error.startswith("error: ") and hint_line.startswith("hint: "), stderr
    for w in words:
        assert w in error, error
    assert CATCH_ALL_HINT not in hint_line, f"reached the catch-all: {error}"
    for w in hint:
        assert w in hint_line, hint_line
    return error, hint_line


def swap_two_bits(file: Path, tensor: str) -> None:
    """Swap two differing bits inside one byte of ``tensor``'s data: same length, same set-bit count."""
    raw = bytearray(file.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8 : 8 + n])[tensor]["data_offsets"]
    for i in range(8 + n + start, 8 + n + end):
        b = raw[i]
        for bit in range(7):
            if ((b >> bit) & 1) != ((b >> (bit + 1)) & 1):
                raw[i] = b ^ (0b11 << bit)
                file.write_bytes(bytes(raw))
                return
    raise AssertionError("no byte with two differing bits")


# a user module (file.py:Class) whose forward runs but returns the wrong shape: its first training batch fails
WRONG_SHAPE = '''
import torch
from torch import nn


class HalfWidth(nn.Module):
    """An image denoiser whose output is half as wide as its input."""

    def __init__(self):
        super().__init__()
        self.config = {"sample_size": 16, "in_channels": 1}
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x)[..., :8]
'''


# --- image folders and models: class folders, a tiny DiT, a latent-diffusion pipeline folder ---------------


def write_png(path, value: int, size: int = 16, seed: int = 0) -> None:
    """A grayscale image around ``value`` (a little seeded texture, so images differ)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = np.clip(value + rng.integers(-20, 21, (size, size)), 0, 255).astype(np.uint8)
    Image.fromarray(arr, mode="L").save(path)


def class_folder(root, counts: dict[str, int], size: int = 16):
    """root/<class>/<i>.png; each class has its own brightness."""
    for k, (name, n) in enumerate(counts.items()):
        for i in range(n):
            write_png(root / name / f"{i}.png", 40 + 60 * k, size, seed=100 * k + i)
    return root


def tiny_dit(num_classes: int = 2):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=4,
        in_channels=1,
        out_channels=1,
        num_layers=1,
        norm_num_groups=1,
        sample_size=16,
        patch_size=4,
        num_embeds_ada_norm=num_classes,
    )


def build_pipeline(root, kind: str, image_size: int = 16) -> dict[str, torch.Tensor]:
    """model_index.json + unet/ + vae/ (AutoencoderKL) or vqvae/ (VQModel); returns the autoencoder's state."""
    from diffusers import AutoencoderKL, UNet2DModel, VQModel

    torch.manual_seed(0)
    common = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=image_size,
    )
    if kind == "vae":
        ae, channels, cls = AutoencoderKL(latent_channels=4, **common), 4, "AutoencoderKL"
    else:
        ae, channels, cls = VQModel(latent_channels=3, num_vq_embeddings=16, vq_embed_dim=3, **common), 3, "VQModel"
    factor = 2 ** (len(common["block_out_channels"]) - 1)
    unet = UNet2DModel(
        sample_size=image_size // factor,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    ae.save_pretrained(root / kind)
    unet.save_pretrained(root / "unet")
    index = {
        "_class_name": "LDMPipeline" if kind == "vqvae" else "DiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DModel"],
        kind: ["diffusers", cls],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return {k: v.clone() for k, v in ae.state_dict().items()}


# --- crafted model folders ---------------------------------------------------------------------------------


def raw_header(file: Path) -> dict[str, str]:
    with safe_open(str(file), "pt") as f:
        return dict(f.metadata())


def resign(folder: Path) -> None:
    """Record digests for a folder's current config.json and header, as a writer would (a crafted folder)."""
    file = folder / "model.safetensors"
    raw = {k: v for k, v in raw_header(file).items() if k != INTEGRITY}
    config = json.loads((folder / "config.json").read_text())
    raw[INTEGRITY] = json.dumps({"metadata": record_digest(raw), "config": record_digest(config)})
    save_file(load_file(file), str(file), metadata=raw)


# a bring-your-own stroke denoiser module (file.py:Class) and a plain module beside it
USER_MODULE = '''
import torch
from torch import nn


class StrokeGRU(nn.Module):
    """A bring-your-own stroke denoiser: 2-layer bidirectional nn.GRU, ChiroDiff's forward(x_t, t, mask)."""

    def __init__(self, hidden: int = 12):
        super().__init__()
        self.t_embed = nn.Linear(1, 4)
        self.rnn = nn.GRU(3 + 4, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, 3)

    def forward(self, x_t, t, mask):
        temb = self.t_embed((t.float()[:, None] / 1000.0))[:, None, :].expand(-1, x_t.shape[1], -1)
        h, _ = self.rnn(torch.cat([x_t, temb], dim=-1))
        return self.head(h) * mask[..., None].to(x_t.dtype)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x)
'''
