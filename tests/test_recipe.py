"""Recipe schema: shipped recipes carry the paper's settings; unknown keys and wrong types are rejected by name."""

from __future__ import annotations

import pytest

from surgeon.errors import SurgeonError
from surgeon.recipe import DST, Recipe, dump_recipe, load_recipe, shipped, split_stages

SHIPPED = ["dense", "magran", "rigl", "static"]  # sparse training from scratch (and its dense baseline)
NM_SHIPPED = ["one-shot", "asp", "ste", "sr-ste", "sparsedm"]  # N:M fine-tuning, one per row of SparseDM's ablation


def _write(tmp_path, text: str, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_recipe_names():
    assert set(SHIPPED + NM_SHIPPED) <= set(shipped())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_carry_the_papers_settings(name):
    r = load_recipe(name)
    assert r.name == name and r.algorithm == name
    assert r.optimizer.weight_decay == 1e-2  # AdamW, weight decay 1e-2 (paper)
    assert r.diffusion.timesteps == 1000  # T = 1000
    assert r.init == "scratch"  # sparse-to-sparse: trained from scratch
    if name != "dense":
        assert r.distribution == "erk" and r.sparsity == 0.5
    if name in ("rigl", "magran"):
        assert r.dst.p == 0.05  # the recommended prune-and-regrow fraction
        assert r.dst.delta_t >= 1 and r.dst.p_decay == "cosine"


def test_schema_defaults_match_the_paper():
    r = Recipe()
    assert r.algorithm == "static" and r.dst is None  # only RigL and MagRan read dst:
    assert DST().p == 0.05 and Recipe(algorithm="rigl").dst.p == 0.05
    assert r.optimizer.weight_decay == 1e-2 and r.diffusion.timesteps == 1000 and r.distribution == "erk"
    assert r.sparsity == 0.5 and r.nm is None and r.lambda_w is None


@pytest.mark.parametrize(
    "text, key",
    [
        ("algorithm: rigl\nsparsity: 0.5\nlearning_rate: 0.1\n", "learning_rate"),
        ("algorithm: rigl\ndst: {delta_t: 10, pp: 0.1}\n", "dst.pp"),
        ("algorithm: rigl\noptimizer: {lr: 1.0e-3, momentum: 0.9}\n", "optimizer.momentum"),
        ("algorithm: rigl\ntraining: {steps: 5, epochs: 2}\n", "training.epochs"),
    ],
)
def test_unknown_keys_are_rejected_by_name(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(SurgeonError) as e:
        load_recipe(path)
    assert f"unknown key '{key}'" in e.value.message
    assert str(path) in e.value.message
    assert e.value.hint  # lists the known keys


@pytest.mark.parametrize(
    "text, where",
    [
        ("sparsity: half\n", "sparsity"),
        ("dst: {delta_t: 2.5}\n", "dst.delta_t"),
        ("dst: {delta_t: '10'}\n", "dst.delta_t"),
        ("dense_first: 'yes'\n", "dense_first"),
        ("optimizer: {betas: [0.9]}\n", "optimizer.betas"),
        ("optimizer: 0.1\n", "optimizer"),
        ("include: conv\n", "include"),
        ("training: {ema_decay: fast}\n", "training.ema_decay"),
        ("distribution: 3\n", "distribution"),
    ],
)
def test_wrong_types_are_rejected(tmp_path, text, where):
    with pytest.raises(SurgeonError) as e:
        load_recipe(_write(tmp_path, "algorithm: static\n" + text))
    assert f"'{where}'" in e.value.message


@pytest.mark.parametrize(
    "text, words",
    [
        ("algorithm: sgd\n", "unknown algorithm"),
        ("algorithm: rigl\nsparsity: 1.0\n", "sparsity"),
        ("algorithm: rigl\ndst: {delta_t: 0}\n", "delta_t"),
        ("algorithm: rigl\ndst: {p: 1.5}\n", "p=1.5"),
        ("algorithm: rigl\ntraining: {mixed_precision: fp8}\n", "mixed_precision"),
        ("algorithm: nm_ste\n", "N:M"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_invalid_values_are_rejected(tmp_path, text, words):
    with pytest.raises(SurgeonError) as e:
        load_recipe(_write(tmp_path, text))
    assert words in e.value.message


def test_yaml_numbers_written_as_strings_are_numbers(tmp_path):
    r = load_recipe(_write(tmp_path, "algorithm: rigl\noptimizer: {lr: 3e-4}\n"))  # PyYAML reads 3e-4 as a string
    assert r.optimizer.lr == 3e-4 and isinstance(r.optimizer.lr, float)


def test_override_sections_and_fields():
    r = load_recipe("rigl")
    o = r.override(**{"sparsity": 0.9, "dst.delta_t": 7, "training.steps": 12, "optimizer.lr": 2e-3, "dst.p": None})
    assert (o.sparsity, o.dst.delta_t, o.training.steps, o.optimizer.lr) == (0.9, 7, 12, 2e-3)
    assert o.dst.p == r.dst.p  # None leaves a field alone
    assert (r.sparsity, r.dst.delta_t) == (0.5, 100)  # a copy: the original is unchanged
    d = o.override(**{"distill.lambda_1": 0.5})  # an unset optional section is created
    assert d.distill is not None and d.distill.lambda_1 == 0.5 and d.distill.lambda_2 == 1.0


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"sparsity": 1.2}, "sparsity"),
        ({"dst.nope": 1}, "unknown key 'dst.nope'"),
        ({"training.steps": "many"}, "'training.steps'"),
        ({"training.steps": -1}, "training.steps"),
    ],
)
def test_override_is_validated(changes, words):
    with pytest.raises(SurgeonError) as e:
        load_recipe("rigl").override(**changes)
    assert words in e.value.message


def test_dump_and_reload_round_trip(tmp_path):
    r = load_recipe("magran").override(**{"sparsity": 0.8, "training.ema_decay": 0.99, "exclude": ["conv_out"]})
    path = _write(tmp_path, dump_recipe(r), "resolved.yaml")
    assert load_recipe(path) == r


def test_unknown_recipe_name_and_missing_file(tmp_path):
    with pytest.raises(SurgeonError) as e:
        load_recipe("riggle")
    assert "unknown recipe 'riggle'" in e.value.message and "rigl" in e.value.hint
    with pytest.raises(SurgeonError) as e:
        load_recipe(tmp_path / "absent.yaml")
    assert "does not exist" in e.value.message


def test_invalid_yaml_is_one_line(tmp_path):
    with pytest.raises(SurgeonError) as e:
        load_recipe(_write(tmp_path, "algorithm: [rigl\n"))
    assert "not valid YAML" in e.value.message and "\n" not in e.value.message


def test_file_recipe_takes_its_name_from_the_file(tmp_path):
    r = load_recipe(_write(tmp_path, "algorithm: static\nsparsity: 0.7\n", "my-static.yaml"))
    assert r.name == "my-static" and r.sparsity == 0.7
    assert load_recipe(_write(tmp_path, "algorithm: static\nname: custom\n", "x.yaml")).name == "custom"


# ------------------------------------------------------------------------------------------- N:M fine-tuning
def test_nm_recipes_are_the_ablation_rows():
    r = {name: load_recipe(name) for name in NM_SHIPPED}
    assert all(x.nm == "2:4" and x.init == "pretrained" and x.sparsity is None and x.dst is None for x in r.values())
    assert r["one-shot"].algorithm == "nm_fixed" and r["one-shot"].training.steps == 0  # no training
    assert r["asp"].algorithm == "nm_fixed" and r["asp"].training.steps > 0  # the mask fixed, then fine-tuned
    assert r["ste"].algorithm == "nm_ste" and r["ste"].lambda_w == 0.0 and r["ste"].distill is None
    assert r["sr-ste"].lambda_w == 2e-4 and r["sr-ste"].distill is None  # SR-STE's default λ_W
    d = r["sparsedm"]
    assert d.lambda_w == 2e-4 and (d.distill.lambda_1, d.distill.lambda_2, d.distill.teacher) == (1.0, 1.0, "dense")


@pytest.mark.parametrize(
    "text, words",
    [
        ("algorithm: nm_ste\nnm: '2:4'\nsparsity: 0.5\n", "nm_ste does not use 'sparsity'"),
        ("algorithm: nm_ste\nnm: '2:4'\ndistribution: er\n", "does not use 'distribution'"),
        ("algorithm: nm_fixed\nnm: '2:4'\nlambda_w: 0.001\n", "nm_fixed does not use 'lambda_w'"),
        ("algorithm: rigl\nlambda_w: 0.001\n", "rigl does not use 'lambda_w'"),
        ("algorithm: static\ndst: {delta_t: 10}\n", "static does not use 'dst'"),
        ("algorithm: rigl\nnm: '2:4'\n", "rigl does not use 'nm'"),
        ("algorithm: dense\nsparsity: 0.5\n", "dense does not use 'sparsity'"),
        ("algorithm: dense\nexclude: [conv_in]\n", "dense does not use 'exclude'"),
        (
            "algorithm: nm_fixed\nnm: '2:4'\nstages: [{nm: '3:4', steps: 5}, {nm: '2:4', steps: 5}]\n",
            "nm_fixed does not use 'stages'",
        ),
    ],
)
def test_a_field_the_algorithm_would_not_read_is_rejected(tmp_path, text, words):
    with pytest.raises(SurgeonError) as e:
        load_recipe(_write(tmp_path, text))
    assert words in e.value.message and e.value.hint


def test_unquoted_nm_patterns_are_patterns_not_base_60_numbers(tmp_path):
    r = load_recipe(
        _write(
            tmp_path,
            "algorithm: nm_ste\nnm: 2:4\ntraining: {steps: 30}\n"
            "stages: [{nm: 7:8, steps: 10}, {nm: 3:4, steps: 10}, {nm: 2:4, steps: 10}]\n",
        )
    )
    assert r.nm == "2:4" and [s.nm for s in r.stages] == ["7:8", "3:4", "2:4"]
    assert r.stage_steps == [((7, 8), 10), ((3, 4), 10), ((2, 4), 10)]
    assert load_recipe(_write(tmp_path, dump_recipe(r), "again.yaml")) == r  # and they survive a dump


@pytest.mark.parametrize(
    "stages, nm, steps, words",
    [
        ([("2:4", 5), ("3:4", 5)], "3:4", 10, "stages must tighten, but 3:4"),
        ([("2:4", 5), ("4:8", 5)], "4:8", 10, "stages must tighten"),  # the same density is not tighter
        ([("3:4", 5), ("2:4", 5)], "2:4", 12, "stages add up to 10 steps but training.steps is 12"),
        ([("3:4", 5), ("2:4", 5)], "1:4", 10, "the last stage (2:4) must be the recipe's nm (1:4)"),
        ([("3:4", 0), ("2:4", 10)], "2:4", 10, "every stage needs"),
        ([("3:4", 5), ("2:3:4", 5)], "2:4", 10, "invalid N:M pattern"),
    ],
)
def test_stages_that_do_not_tighten_or_add_up_are_rejected(stages, nm, steps, words):
    with pytest.raises(SurgeonError) as e:
        load_recipe("sparsedm").override(
            **{"nm": nm, "training.steps": steps, "stages": [{"nm": p, "steps": n} for p, n in stages]}
        )
    assert words in e.value.message


def test_teacher_previous_needs_stages_and_split_stages_fills_the_steps():
    with pytest.raises(SurgeonError, match="teacher: previous needs progressive stages"):
        load_recipe("sparsedm").override(**{"distill.teacher": "previous"})
    assert split_stages(["7:8", "3:4", "2:4"], 10) == [
        {"nm": "7:8", "steps": 3},
        {"nm": "3:4", "steps": 3},
        {"nm": "2:4", "steps": 4},
    ]
    with pytest.raises(SurgeonError, match="cannot split 2 steps into 3 stages"):
        split_stages(["7:8", "3:4", "2:4"], 2)
