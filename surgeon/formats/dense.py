"""``dense``: masks folded into plain weights, written the way the model's ecosystem reads them.

- a diffusers model to a folder: ``save_pretrained`` (``config.json`` + ``diffusion_pytorch_model.safetensors``),
  which stock ``from_pretrained`` loads;
- with a pipeline (``--pipeline``): the whole latent pipeline folder with the sparse denoiser in place, which stock
  ``DiffusionPipeline.from_pretrained`` loads;
- ``--out x.safetensors``: one self-describing surgeon file, the config inside its metadata;
- any other module: a surgeon folder (``config.json`` with the recorded class + ``model.safetensors``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from surgeon.errors import SurgeonError
from surgeon.formats.common import Options, Row, build_plain, cast, nbytes, target_kinds
from surgeon.formats.packed import header_fields, plain_state, write_model
from surgeon.io.atomic import atomic_folder, check_output
from surgeon.io.classes import is_diffusers_class, read_json
from surgeon.io.container import read_tensors
from surgeon.io.folders import copy_folder, inside
from surgeon.masking.surgery import fold, sites

LAYOUT = "dense"
DENOISER_PARTS = ("unet", "transformer")


def write(model: nn.Module, out: Path, opts: Options) -> list[Row]:
    """Write ``model`` with its masks folded in; a caller's model is only read (no copy of it is made)."""
    kinds = target_kinds(model)
    if opts.owned:
        fold(model)  # loaded for this export: folding in place frees each masked tensor's storage as it goes
    state = folded_state(model, opts.dtype)
    if opts.pipeline is not None:
        _write_pipeline(model, state, Path(opts.pipeline), out, opts.force, opts.recipe)
    elif is_diffusers_class(type(model)) and out.suffix != ".safetensors":
        check_output(out, opts.force)
        with atomic_folder(out, opts.force) as tmp:
            _holding(model, state).save_pretrained(tmp, safe_serialization=True)
            sampler = recorded_sampler(model, opts.recipe)
            if sampler is not None:  # a DDIMScheduler loaded from the folder then samples as surgeon does
                (tmp / SCHEDULER_CONFIG).write_text(json.dumps(sampler, indent=2) + "\n")
    else:
        write_model(model, out, state, LAYOUT, header_fields(model, {}, opts.recipe, opts.extra), opts.force)
    return [Row(fqn, kind, shape, "dense", nbytes(state[fqn]), "dense") for fqn, (kind, shape) in kinds.items()]


@torch.no_grad()
def folded_state(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The plain state dict the folded model would have, without changing ``model``: a fixed mask's weight is its
    stored tensor (0 where pruned), shared, not copied; an N:M weight is computed, S(W)."""
    state = plain_state(model, dtype)
    for fqn, site in sites(model).items():
        w = site.original.detach()
        w = (w if not site.is_nm else w * site.mask).to("cpu").contiguous()
        state[fqn] = cast(w, dtype)
    return state


def _holding(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain model of ``model``'s diffusers class holding ``state``'s tensors themselves (built on the meta
    device, the tensors assigned): what ``save_pretrained`` writes, without a copy of the model."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        plain = type(model).from_config(model.config)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain


def denoiser_part(pipeline: Path) -> str:
    """Which subfolder of a pipeline holds the denoiser (``unet`` or ``transformer``)."""
    index_file = pipeline / "model_index.json"
    index = read_json(inside(pipeline, index_file)) if index_file.is_file() else {}
    for part in DENOISER_PARTS:
        if part in index and (pipeline / part).is_dir():
            return part
    raise SurgeonError(
        f"{pipeline} is not a pipeline folder with a unet or transformer", "export the model alone (drop --pipeline)"
    )


def recorded_clip_sample(recipe) -> bool | None:
    """The sampler setting a saved model's recipe records (``diffusion.clip_sample``), None when it records none."""
    recipe = recipe.to_dict() if hasattr(recipe, "to_dict") else recipe
    value = ((recipe or {}).get("diffusion") or {}).get("clip_sample")
    return value if isinstance(value, bool) else None


def _write_pipeline(
    model: nn.Module, state: dict[str, torch.Tensor], pipeline: Path, out: Path, force: bool, recipe
) -> None:
    if not is_diffusers_class(type(model)):
        raise SurgeonError(f"--pipeline needs a diffusers model, not {type(model).__name__}", "drop --pipeline")
    part = denoiser_part(pipeline)
    check_output(out, force)
    with atomic_folder(out, force) as tmp:
        # every other component as it is (scheduler, autoencoder, model_index.json), never a file linked from outside
        copy_folder(pipeline, tmp, skip={part})
        _holding(model, state).save_pretrained(tmp / part, safe_serialization=True)
        sampler = recorded_sampler(model, recipe, latent=True)
        _record_sampler(tmp / "scheduler" / SCHEDULER_CONFIG, sampler, recorded_clip_sample(recipe))


SCHEDULER_CONFIG = "scheduler_config.json"
# the training noise schedule: every diffusers scheduler takes these, and sampling must use the one trained on
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")


def recorded_sampler(model: nn.Module, recipe, latent: bool = False) -> dict | None:
    """The DDIMScheduler config surgeon samples ``model`` with (``surgeon eval``, ``samples.png``): the noise
    schedule the recorded recipe trained on (unset betas: the task's defaults) and its ``clip_sample`` (unrecorded:
    on in pixel space, off for a ``latent`` model); None when no recipe is recorded or the model is not a diffusers
    image denoiser. DDIM's η is an argument of the sampling call, not of the scheduler: call the pipeline with the
    recorded ``diffusion.eta`` and ``use_clipped_model_output=True``."""
    from surgeon.recipe import Recipe
    from surgeon.tasks import apply_diffusion_settings, is_image_model, make_task

    recipe = recipe.to_dict() if hasattr(recipe, "to_dict") else recipe
    if not (recipe or {}).get("diffusion") or not is_image_model(model):
        return None
    from diffusers import DDIMScheduler

    task = make_task(model, "unused")  # no data is read: only the noise schedule and the sampler
    if latent:  # the task was built without the autoencoder, so its default would be pixel space's
        task.set_clip_sample(False)
    apply_diffusion_settings(task, Recipe.from_dict({"diffusion": recipe["diffusion"]}).diffusion)
    config = dict(task.sampling_scheduler(DDIMScheduler).config)
    return {"_class_name": "DDIMScheduler", **{k: v for k, v in config.items() if not k.startswith("_")}}


def _record_sampler(config: Path, sampler: dict | None, clip_sample: bool | None) -> None:
    """The exported pipeline's scheduler samples as the model was sampled when it was trained and scored: the
    training noise schedule, clip_sample, and for a DDIMScheduler every other setting of surgeon's DDIM (timestep
    spacing, final ᾱ)."""
    if not config.is_file() or (sampler is None and clip_sample is None):
        return
    data = read_json(config)
    kind = data.get("_class_name")
    if sampler is not None:
        clip_keys = ("_class_name", "clip_sample", "clip_sample_range")  # below: only where one was recorded
        keys = [k for k in sampler if k not in clip_keys] if kind == "DDIMScheduler" else SCHEDULE_KEYS
        data.update({k: sampler[k] for k in keys if k in sampler})
    if clip_sample is not None and ("clip_sample" in data or kind in ("DDIMScheduler", "DDPMScheduler")):
        data["clip_sample"] = clip_sample
        if clip_sample:
            data["clip_sample_range"] = 1.0
    config.write_text(json.dumps(data, indent=2) + "\n")


def read(meta: Mapping, device: torch.device | str | None = None) -> nn.Module:
    model = build_plain(meta, read_tensors(meta["file"]))
    return model.to(device) if device is not None else model
