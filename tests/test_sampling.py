"""The sampler: pixel-space images clip the predicted x₀ to [-1, 1] at every DDIM step (diffusers'
``clip_sample=True``) and re-derive ε from the clipped x₀ (ADM's DDIM); latent and sequence models do not unless
asked. The setting is chosen per task when a run
starts, written into its recipe, and followed by every later sampling (load, export, resume, eval); so is DDIM's η
(diffusion.eta, 0 unless a recipe sets it)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import build_pipeline
from helpers_train import SyntheticImageTask, one_thread, small_recipe  # noqa: F401
from typer.testing import CliRunner

import surgeon
from surgeon.cli.app import app
from surgeon.data import cache
from surgeon.errors import SurgeonError
from surgeon.formats import loading
from surgeon.io.container import read_metadata
from surgeon.models import presets
from surgeon.recipe import Recipe
from surgeon.tasks import apply_diffusion_settings, make_task
from surgeon.tasks.sequences import SequenceTask
from surgeon.training.run import sparsify


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))


def reference_ddim(model, n, shape, steps, clip, seed=0, decode=None):
    """Sampling written out with diffusers' own DDIMScheduler, built from explicit arguments (clipping re-derives ε
    from the clipped x₀, diffusers' ``use_clipped_model_output``)."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="linear", clip_sample=clip
    )
    ddim.set_timesteps(steps)
    x = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(model(x, t.expand(n)).sample, t, x, use_clipped_model_output=clip).prev_sample
        return (decode(x) if decode else x).clamp(-1, 1)


@pytest.mark.parametrize("steps", [2, 4])  # one step: the final clamp alone equals the clip
def test_pixel_ddim_step_equals_diffusers_with_clip_sample(steps):
    model = presets.build("tiny-unet", seed=0).eval()
    task = make_task(model, "kanjivg")
    assert task.clip_sample is True
    ours = task.sample(model, 3, generator=torch.Generator().manual_seed(0), steps=steps)
    shape = (task.latent_channels, task.latent_size, task.latent_size)
    clipped = reference_ddim(model, 3, shape, steps, clip=True)
    unclipped = reference_ddim(model, 3, shape, steps, clip=False)
    torch.testing.assert_close(ours, clipped, rtol=0, atol=1e-6)
    assert (ours - unclipped).abs().max() > 1e-2  # the inputs are ones where clipping changes the result


def adm_ddim(model, x, abar, rederive: bool):
    """Two DDIM steps (t = 500, then t = 0) written out: x̂₀ = clip((x_t − √(1−ᾱ_t)·ε)/√ᾱ_t), then
    x_prev = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev)·ε̂ with ε̂ = (x_t − √ᾱ_t·x̂₀)/√(1−ᾱ_t) (ADM) or the raw ε."""
    with torch.no_grad():
        for t, a_prev in ((500, abar[0]), (0, torch.tensor(1.0, dtype=torch.float64))):
            eps = model(x, torch.tensor(t).expand(len(x))).sample.double()
            x0 = ((x.double() - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-1, 1)
            if rederive:
                eps = (x.double() - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()
            x = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).float()
    return x


def test_a_clipped_ddim_step_re_derives_eps_from_the_clipped_x0_as_adm_does():
    model = presets.build("tiny-unet", seed=0).eval()
    task = make_task(model, "kanjivg")
    ours = task.sample(model, 3, generator=torch.Generator().manual_seed(0), steps=2)
    shape = (3, task.latent_channels, task.latent_size, task.latent_size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    abar = task.scheduler.alphas_cumprod.double()
    torch.testing.assert_close(ours, adm_ddim(model, x, abar, rederive=True), rtol=0, atol=1e-5)
    # the random model's x̂₀ leaves [-1, 1], so keeping the raw ε (diffusers' default) gives another result
    assert (ours - adm_ddim(model, x, abar, rederive=False)).abs().max() > 1e-2


def test_eta_samples_as_diffusers_ddim_pipeline_called_with_it():
    """η > 0 (a recipe's diffusion.eta) draws each step's noise from the sampling generator as diffusers'
    DDIMPipeline does: the pipeline called with the same eta and use_clipped_model_output=True gives the images."""
    from diffusers import DDIMPipeline, DDIMScheduler

    model = presets.build("tiny-unet", seed=0).eval()
    task = make_task(model, "kanjivg")
    apply_diffusion_settings(task, Recipe.from_dict({"diffusion": {"eta": 1.0}}).diffusion)
    assert task.eta == 1.0
    ours = task.sample(model, 3, generator=torch.Generator().manual_seed(0), steps=4)
    pipe = DDIMPipeline(unet=model, scheduler=task.sampling_scheduler(DDIMScheduler))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        batch_size=3,
        generator=torch.Generator().manual_seed(0),
        eta=1.0,
        num_inference_steps=4,
        use_clipped_model_output=True,
        output_type="pt",
    )
    torch.testing.assert_close((ours + 1) / 2, out.images, rtol=0, atol=1e-6)
    task.eta = 0.0
    deterministic = task.sample(model, 3, generator=torch.Generator().manual_seed(0), steps=4)
    torch.testing.assert_close(deterministic, reference_ddim(model, 3, ours.shape[1:], 4, clip=True), rtol=0, atol=1e-6)
    assert (ours - deterministic).abs().max() > 1e-2  # η's noise changed the samples


def test_latent_ddim_equals_diffusers_without_clipping(tmp_path):
    build_pipeline(tmp_path / "pipe", "vae")
    model = loading.load_model(str(tmp_path / "pipe")).eval()
    task = make_task(model, "unused", vae=loading.find_autoencoder(str(tmp_path / "pipe")))
    assert task.clip_sample is False
    ours = task.sample(model, 2, generator=torch.Generator().manual_seed(0), steps=2)
    shape = (task.latent_channels, task.latent_size, task.latent_size)
    ref = reference_ddim(model, 2, shape, 2, clip=False, decode=task.decode)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    clipped = reference_ddim(model, 2, shape, 2, clip=True, decode=task.decode)
    assert (ref - clipped).abs().max() > 1e-3


def test_sequences_do_not_clip_unless_asked():
    task = SequenceTask()
    assert task.clip_sample is False
    apply_diffusion_settings(task, Recipe.from_dict({"diffusion": {"clip_sample": True}}).diffusion)
    assert task.clip_sample is True
    from diffusers import DDIMScheduler

    assert task.sampling_scheduler(DDIMScheduler).config.clip_sample is True


def test_a_latent_model_refuses_clipping_in_one_line(tmp_path):
    build_pipeline(tmp_path / "pipe", "vae")
    model = loading.load_model(str(tmp_path / "pipe"))
    task = make_task(model, "unused", vae=loading.find_autoencoder(str(tmp_path / "pipe")))
    with pytest.raises(SurgeonError) as e:
        task.set_clip_sample(True)
    assert "latent" in e.value.message and "\n" not in e.value.message and e.value.hint
    task.set_clip_sample(False)  # turning it off is always possible


def _pixel_run(tmp_path, name="run", **changes):
    model = presets.build("tiny-unet", seed=0)
    recipe = small_recipe("rigl", **{"training.checkpoint_every": 6, **changes})
    out = tmp_path / name
    sparsify(model, recipe, SyntheticImageTask(model), out, progress=False)
    return out


def test_the_task_default_is_written_into_the_recipe_and_the_model(tmp_path):
    out = _pixel_run(tmp_path)
    assert yaml.safe_load((out / "recipe.yaml").read_text())["diffusion"]["clip_sample"] is True
    assert read_metadata(out / "model")["recipe"]["diffusion"]["clip_sample"] is True
    off = _pixel_run(tmp_path, "off", **{"diffusion.clip_sample": False})
    assert read_metadata(off / "model")["recipe"]["diffusion"]["clip_sample"] is False


def _sampler_used(ref):
    """The task as eval opens ``ref``: its clip_sample and eta are what sampling will use."""
    from surgeon.evaluation.evaluate import open_model

    model, recipe, vae, _ = open_model(ref)
    task = make_task(model, "unused", vae=vae)
    if recipe.get("diffusion"):
        apply_diffusion_settings(task, Recipe.from_dict(recipe).diffusion)
    return task


def _clip_used(ref) -> bool:
    return _sampler_used(ref).clip_sample


def test_the_setting_survives_save_load_export_and_resume(tmp_path):
    sampler = {"diffusion.clip_sample": False, "diffusion.eta": 1.0}
    out = _pixel_run(tmp_path, "off", **sampler)
    assert yaml.safe_load((out / "recipe.yaml").read_text())["diffusion"]["eta"] == 1.0
    surgeon.export(out / "model", tmp_path / "packed", format="packed")
    surgeon.export(out / "model", tmp_path / "one.safetensors", format="dense")
    for ref in (out, tmp_path / "packed", tmp_path / "one.safetensors"):  # the run folder, as eval opens it, too
        task = _sampler_used(ref)
        assert (task.clip_sample, task.eta) == (False, 1.0), ref
    # resume: the interrupted run continues with the setting it recorded
    model = presets.build("tiny-unet", seed=0)
    recipe = small_recipe("rigl", **{"training.checkpoint_every": 6, **sampler})
    resumed = tmp_path / "resumed"
    sparsify(model, recipe, SyntheticImageTask(model), resumed, progress=False, stop_after=6)
    model = presets.build("tiny-unet", seed=0)
    sparsify(model, recipe, SyntheticImageTask(model), resumed, progress=False, resume=resumed)
    diffusion = yaml.safe_load((resumed / "recipe.yaml").read_text())["diffusion"]
    assert diffusion["clip_sample"] is False and diffusion["eta"] == 1.0
    task = _sampler_used(resumed)
    assert (task.clip_sample, task.eta) == (False, 1.0)


def test_a_model_saved_before_the_field_gets_the_task_default(tmp_path):
    model = presets.build("tiny-unet", seed=0)
    old = small_recipe("rigl").to_dict()
    del old["diffusion"]["clip_sample"], old["diffusion"]["eta"]  # what a recipe written before the fields holds
    surgeon.save(model, tmp_path / "old", recipe=old)
    task = _sampler_used(tmp_path / "old")
    assert task.clip_sample is True and task.eta == 0.0  # deterministic DDIM, as such a model was sampled


def test_an_exported_pipeline_samples_as_the_model_recorded(tmp_path):
    build_pipeline(tmp_path / "pipe", "vae")
    (tmp_path / "pipe" / "scheduler").mkdir()
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDIMScheduler", "clip_sample": True})
    )
    model = loading.load_model(str(tmp_path / "pipe"))
    surgeon.save(model, tmp_path / "saved", recipe=small_recipe("dense", **{"diffusion.clip_sample": False}))
    surgeon.export(tmp_path / "saved", tmp_path / "deploy", format="dense", pipeline=tmp_path / "pipe")
    config = json.loads((tmp_path / "deploy" / "scheduler" / "scheduler_config.json").read_text())
    assert config["clip_sample"] is False


def test_eval_override_on_a_latent_model_is_one_error(tmp_path):
    build_pipeline(tmp_path / "pipe", "vae")
    result = CliRunner().invoke(
        app, ["eval", str(tmp_path / "pipe"), "--clip-sample", "--n", "4", "--out", str(tmp_path / "ev")]
    )
    assert result.exit_code == 1, result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert lines[-2].startswith("error: ") and "clip_sample" in lines[-2] and "latent" in lines[-2]
    assert lines[-1].startswith("hint: ")
    assert "Traceback" not in result.output and not (tmp_path / "ev").exists()


def test_an_exported_pixel_pipeline_and_model_folder_sample_as_surgeon_does(tmp_path):
    """The pipeline's own scheduler is diffusers' default (β 1e-4 to 2e-2), not the schedule surgeon trained and
    scored the model on: the export writes the recorded one, so DDIMPipeline called with the recorded eta and
    use_clipped_model_output=True draws surgeon's samples; a model folder exported alone carries it beside config.json."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    model = presets.build("tiny-unet", seed=0)
    DDIMPipeline(unet=model, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    recipe = small_recipe("dense", **{"diffusion.eta": 1.0, "diffusion.clip_sample": True})
    surgeon.save(model, tmp_path / "saved", recipe=recipe)
    surgeon.export(tmp_path / "saved", tmp_path / "deploy", format="dense", pipeline=tmp_path / "pipe")
    surgeon.export(tmp_path / "saved", tmp_path / "unet", format="dense")
    task = _sampler_used(tmp_path / "saved")
    ours = task.sample(surgeon.load_model(tmp_path / "saved"), 2, generator=torch.Generator().manual_seed(0), steps=3)
    alone = UNet2DModel.from_pretrained(tmp_path / "unet", use_safetensors=True)
    for pipe in (
        DDIMPipeline.from_pretrained(tmp_path / "deploy", use_safetensors=True),
        DDIMPipeline(unet=alone, scheduler=DDIMScheduler.from_config(DDIMScheduler.load_config(tmp_path / "unet"))),
    ):
        pipe.set_progress_bar_config(disable=True)
        images = pipe(
            batch_size=2,
            generator=torch.Generator().manual_seed(0),
            eta=recipe.diffusion.eta,
            num_inference_steps=3,
            use_clipped_model_output=True,
            output_type="pt",
        ).images
        torch.testing.assert_close((ours + 1) / 2, images, rtol=0, atol=1e-6)
