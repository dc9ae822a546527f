"""ImageTask: class-conditional training on class folders, and latent diffusion on a pipeline folder.

Class folders (``root/<class>/*.png``) give labels 0..K-1 in sorted folder order; a class-conditional model trains
on exactly those labels and samples every class in turn; unconditional models ignore them. A latent-diffusion
pipeline folder (``model_index.json`` + ``unet/`` + ``vae/`` or ``vqvae/``) sparsifies only the denoiser: the
autoencoder stays dense, frozen and unchanged, latents are scaled by its scaling factor, samples are decoded.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers import assert_one_error, build_pipeline, class_folder, invoke, tiny_dit, write_png
from helpers_train import one_thread, small_recipe  # noqa: F401
from PIL import Image

import surgeon
import surgeon.formats.loading as loading_mod
import surgeon.training.loop as train_mod
from surgeon.data import cache, resolve_image_data
from surgeon.data.images import ImageFolder, class_folders
from surgeon.errors import SurgeonError
from surgeon.io.container import read_metadata
from surgeon.masking.surgery import get_plan, sites
from surgeon.tasks import make_task
from surgeon.tasks.images import ImageTask
from surgeon.training.loop import BatchSampler, train
from surgeon.training.run import prepare, sparsify


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))


def cond_unet(num_class_embeds: int | None = 4, seed: int = 0, **changes):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    cfg = dict(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
    )
    cfg.update(changes)
    return UNet2DModel(**cfg)


# --- class folders ---------------------------------------------------------------------------------------------


def test_class_folders_give_sorted_labels_and_nested_images_keep_their_class(tmp_path):
    root = class_folder(tmp_path / "data", {"zebra": 2, "ant": 3})
    write_png(root / "ant" / "deeper" / "x.png", 200)  # below a class folder: still that class
    write_png(root / ".ipynb_checkpoints" / "copy.png", 0)  # hidden folders are no class
    ds = ImageFolder(root, size=8, channels=1)
    assert ds.classes == ["ant", "zebra"] == class_folders(root)
    assert len(ds) == 6
    for i, f in enumerate(ds.files):
        image, label = ds[i]
        assert image.shape == (1, 8, 8) and torch.equal(image, ds.image(i))
        assert label == {"ant": 0, "zebra": 1}[f.relative_to(root).parts[0]]
    assert sorted(ds.labels) == [0, 0, 0, 0, 1, 1]


def test_images_directly_in_the_folder_mean_no_classes(tmp_path):
    root = class_folder(tmp_path / "data", {"a": 1, "b": 1})
    write_png(root / "loose.png", 10)
    ds = ImageFolder(root, size=8, channels=1)
    assert ds.classes is None and ds.labels is None and class_folders(root) is None
    assert torch.is_tensor(ds[0]) and ds[0].shape == (1, 8, 8)  # bare images, as before


def test_validation_split_numbers_classes_as_training_does(tmp_path):
    class_folder(tmp_path / "train", {"a": 1, "b": 1, "c": 1})
    class_folder(tmp_path / "validation", {"c": 2})  # "c" alone would be class 0 on its own
    val = resolve_image_data(str(tmp_path), size=8, channels=1, split="val")
    assert val.classes == ["a", "b", "c"] and val.labels == [2, 2]
    class_folder(tmp_path / "validation", {"d": 1})
    with pytest.raises(SurgeonError, match="class folder 'd', which the training split does not have"):
        resolve_image_data(str(tmp_path), size=8, channels=1, split="validation")


def test_flat_validation_next_to_class_folders_is_an_error(tmp_path):
    class_folder(tmp_path / "train", {"a": 1, "b": 1})
    write_png(tmp_path / "val" / "x.png", 10)
    with pytest.raises(SurgeonError, match="has no class folders") as err:
        resolve_image_data(str(tmp_path), size=8, channels=1, split="validation")
    assert "class folders (a, b)" in err.value.hint


# --- class-conditional ImageTask ------------------------------------------------------------------------------


def test_collate_and_noisy_batch_pass_labels_only_to_conditional_models(tmp_path):
    root = class_folder(tmp_path / "data", {"a": 2, "b": 2})
    cond = ImageTask(cond_unet(4), data=str(root))
    ds = cond.dataset("train")
    batch = cond.collate([ds[i] for i in range(4)])
    assert batch["images"].shape == (4, 1, 16, 16) and batch["labels"].tolist() == ds.labels
    inputs, eps, _ = cond.noisy_batch(batch, torch.Generator().manual_seed(0))
    assert inputs["class_labels"].tolist() == ds.labels and inputs["class_labels"].dtype == torch.long
    assert cond.predict(cond_unet(4), inputs).shape == eps.shape

    plain = ImageTask(cond_unet(None), data=str(root))
    inputs2, eps2, _ = plain.noisy_batch(
        plain.collate([plain.dataset()[i] for i in range(4)]), torch.Generator().manual_seed(0)
    )
    assert "class_labels" not in inputs2  # unconditional: labels ignored, same noise as before
    assert torch.equal(eps2, eps) and torch.equal(inputs2["x_t"], inputs["x_t"])
    bare, _, _ = plain.noisy_batch(batch["images"], torch.Generator().manual_seed(0))  # a bare tensor still works
    assert torch.equal(bare["x_t"], inputs["x_t"])


def test_training_feeds_each_batch_its_own_labels(tmp_path):
    root = class_folder(tmp_path / "data", {"a": 3, "b": 3, "c": 2})
    model = cond_unet(4)
    recipe = small_recipe("rigl", **{"training.steps": 3, "training.batch_size": 4})
    prepare(model, recipe)
    task = ImageTask(model, data=str(root))
    seen = []
    hook = model.class_embedding.register_forward_pre_hook(lambda m, args: seen.append(args[0].tolist()))
    train(model, task, recipe, tmp_path / "run", progress=False)
    ds = task.dataset("train")
    sampler = BatchSampler(len(ds), 4, recipe.training.seed)
    want = [[ds.labels[i] for i in sampler.indices(step)] for step in range(3)]
    assert seen == want and len({x for b in want for x in b}) > 1

    seen.clear()
    task.sample(model, 7, generator=torch.Generator().manual_seed(0), steps=2)
    hook.remove()
    assert seen == [[0, 1, 2, 0, 1, 2, 0]] * 2  # the data's 3 classes in turn (not the table's 4), every step


def test_sampled_classes_change_the_samples(tmp_path):
    model = cond_unet(3).eval()
    with torch.no_grad():
        model.class_embedding.weight.mul_(50)  # make the label matter a lot
    task = ImageTask(model, data="unused")
    a = task.sample(model, 2, generator=torch.Generator().manual_seed(0), steps=2, labels=[0, 0])
    b = task.sample(model, 2, generator=torch.Generator().manual_seed(0), steps=2, labels=[0, 2])
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    assert task.sample_labels(5).tolist() == [0, 1, 2, 0, 1]  # no data loaded: the model's table


def test_class_conditional_sparsify_with_train_and_validation_class_folders(tmp_path):
    class_folder(tmp_path / "data" / "train", {"a": 3, "b": 3})
    class_folder(tmp_path / "data" / "validation", {"b": 2})
    model_dir = tmp_path / "model"
    cond_unet(2).save_pretrained(model_dir)
    recipe = small_recipe("static", **{"training.steps": 2, "training.num_samples": 4})
    summary = sparsify(str(model_dir), recipe, str(tmp_path / "data"), tmp_path / "out", progress=False)
    assert summary.val_loss is not None and np.isfinite(summary.val_loss)
    assert summary.sparsity == pytest.approx(0.5, abs=1e-3)
    with Image.open(tmp_path / "out" / "samples.png") as im:
        assert im.size == (2 * 18 + 2, 2 * 18 + 2)


def test_dit_classes_come_from_num_embeds_ada_norm(tmp_path):
    two = class_folder(tmp_path / "two", {"a": 1, "b": 1})
    task = ImageTask(tiny_dit(2), data=str(two))
    batch = task.collate([task.dataset()[i] for i in range(2)])
    inputs, eps, _ = task.noisy_batch(batch, torch.Generator().manual_seed(0))
    assert inputs["class_labels"].tolist() == [0, 1]
    assert task.predict(tiny_dit(2).eval(), inputs).shape == eps.shape
    three = class_folder(tmp_path / "three", {"a": 1, "b": 1, "c": 1})
    with pytest.raises(SurgeonError, match="has 3 classes, but the model's class embedding has only 2") as err:
        ImageTask(tiny_dit(2), data=str(three)).dataset("train")
    assert "num_embeds_ada_norm >= 3" in err.value.hint


@pytest.mark.parametrize(
    "data, words",
    [
        ("flat", "has no class folders"),
        ("many", "has 5 classes, but the model's class embedding has only 4 (num_class_embeds=4)"),
        ("kanjivg", "KanjiVG glyphs have no classes"),
    ],
)
def test_data_that_does_not_fit_a_conditional_model(tmp_path, data, words):
    if data == "flat":
        for i in range(3):
            write_png(tmp_path / "flat" / f"{i}.png", 50, seed=i)
    if data == "many":
        class_folder(tmp_path / "many", {c: 1 for c in "abcde"})
    spec = data if data == "kanjivg" else str(tmp_path / data)
    with pytest.raises(SurgeonError, match=re.escape(words)) as err:
        ImageTask(cond_unet(4), data=spec).dataset("train")
    assert err.value.hint
    if data != "many":
        assert "unconditional" in err.value.hint and "subfolder" in err.value.hint


def test_cli_refuses_kanjivg_for_a_class_conditional_model(tmp_path):
    model_dir = tmp_path / "model"
    cond_unet(4).save_pretrained(model_dir)
    out = tmp_path / "out"
    r = invoke("sparsify", model_dir, "--data", "kanjivg", "--out", out, "--steps", 2, "--no-progress")
    assert_one_error(r, "KanjiVG glyphs have no classes", hint=["unconditional"])
    assert not out.exists()


def test_class_embeddings_that_take_vectors_are_refused():
    with pytest.raises(SurgeonError, match="class_embed_type='identity' is conditioned on vectors"):
        ImageTask(cond_unet(None, class_embed_type="identity"), data="unused")


# --- latent diffusion: a pipeline folder with a frozen autoencoder --------------------------------------------


@pytest.mark.parametrize("kind", ["vae", "vqvae"])
def test_latent_pipeline_sparsifies_only_the_denoiser(tmp_path, monkeypatch, kind):
    before = build_pipeline(tmp_path / "pipe", kind)
    data = tmp_path / "images"
    for i in range(8):
        write_png(data / f"{i}.png", 30 * i, size=24, seed=i)  # resized to the 16-pixel image size
    seen = {}
    real_find, real_train = loading_mod.find_autoencoder, train_mod.train

    def find(ref):
        seen["ae"] = real_find(ref)
        return seen["ae"]

    def spy_train(model, task, *a, **k):
        seen["model"], seen["task"] = model, task
        x = task.collate([task.dataset("train")[i] for i in range(2)])
        seen["x_t"] = task.noisy_batch(x, torch.Generator().manual_seed(0))[0]["x_t"].shape
        return real_train(model, task, *a, **k)

    monkeypatch.setattr(loading_mod, "find_autoencoder", find)
    monkeypatch.setattr(train_mod, "train", spy_train)
    recipe = small_recipe("rigl", **{"training.steps": 4, "dst.delta_t": 2, "training.num_samples": 4})
    out = tmp_path / "out"
    summary = sparsify(str(tmp_path / "pipe"), recipe, str(data), out, progress=False)

    ae, task = seen["ae"], seen["task"]
    latent_channels = 4 if kind == "vae" else 3
    assert seen["x_t"] == (2, latent_channels, 8, 8)  # the denoiser trains on latents
    assert task.image_size == 16 and task.scaling == pytest.approx(0.18215)
    # the autoencoder: frozen, never masked, weights exactly as saved
    assert sites(ae) == {} and not any(p.requires_grad for p in ae.parameters())
    assert all(torch.equal(ae.state_dict()[k], v) for k, v in before.items())
    reloaded = type(ae).from_pretrained(tmp_path / "pipe" / kind, use_safetensors=True)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in before.items())
    # the denoiser: masked at the requested sparsity, exact per-layer counts, loads back
    assert summary.sparsity == pytest.approx(0.5, abs=1e-3)
    loaded = surgeon.load(out / "model")
    plan, masked = get_plan(loaded), sites(loaded)
    assert type(loaded).__name__ == "UNet2DModel" and len(masked) > 0
    assert all(int(s.mask.sum()) == plan.layers[f].kept for f, s in masked.items())
    assert all(torch.equal(s.mask, sites(seen["model"])[f].mask) for f, s in masked.items())
    # the saved denoiser names the pipeline whose autoencoder decodes it
    pipeline = str((tmp_path / "pipe").resolve())
    assert summary.pipeline == pipeline and read_metadata(out / "model")["extra"]["pipeline"] == pipeline
    # samples are decoded images (16 px, RGB), not latents (8 px): a 2 x 2 grid with 2 px padding
    with Image.open(out / "samples.png") as im:
        assert im.size == (2 * (16 + 2) + 2,) * 2 and im.mode == "RGB"


def test_latents_are_scaled_by_the_autoencoder_scaling_factor(tmp_path):
    from diffusers import AutoencoderKL

    build_pipeline(tmp_path / "pipe", "vae")
    ae = AutoencoderKL.from_pretrained(tmp_path / "pipe" / "vae", use_safetensors=True)
    task = make_task(
        surgeon.load_model(tmp_path / "pipe"), "unused", vae=loading_mod.find_autoencoder(tmp_path / "pipe")
    )
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    z = task.encode(images, torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ae.encode(images).latent_dist.sample(torch.Generator().manual_seed(3)) * ae.config.scaling_factor
        assert torch.allclose(z, want, atol=1e-6)
        assert torch.allclose(task.decode(z), ae.decode(z / ae.config.scaling_factor).sample, atol=1e-6)
