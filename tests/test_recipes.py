"""Recipes as data: presets, round trips through dicts and YAML files, and the errors of a bad recipe."""

from __future__ import annotations

import json

import pytest

import fewbit
from fewbit import recipes
from fewbit.recipes import Recipe

ALL = recipes.names(include_training=True)

# What `fewbit study` evaluates, in its order: pinned, a study's tables and cached runs depend on it.
STUDY = ["fp32", "bf16", "fp16", "fp8", "fp8_current", "mxfp8", "mxfp6", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4",
         "mxfp4_a8", "mxfp4_a4", "mxint8", "int8", "w4a16"]


def test_study_names_unchanged_and_training_presets_listed_after_them():
    assert recipes.names() == STUDY
    assert ALL == [*STUDY, "bf16_mixed", "fp16_mixed", "fp16_pure"]
    for name in ALL[len(STUDY):]:  # training-only: no layer arithmetic changes
        assert recipes.get(name).is_identity


@pytest.mark.parametrize("name", ALL)
def test_round_trips_through_dict_json_and_yaml_file(name, tmp_path):
    recipe = recipes.get(name)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert recipes.get(json.loads(json.dumps(recipe.to_dict()))) == recipe
    path = tmp_path / f"{name}.yaml"
    path.write_text(recipe.to_yaml())
    assert recipes.get(str(path)) == recipe
    assert recipes.get(path) == recipe  # a Path too
    assert Recipe.from_yaml(path) == recipe
    yml = tmp_path / "copy.yml"
    yml.write_text(recipe.to_yaml())
    assert recipes.get(str(yml)) == recipe


def test_get_returns_a_recipe_as_is():
    recipe = Recipe(name="mine", weight="mxfp8_e4m3")
    assert recipes.get(recipe) is recipe


def test_file_without_a_name_is_named_after_the_file(tmp_path):
    path = tmp_path / "my_fp8.yaml"
    path.write_text("weight: fp8_e4m3_tensor\ninput: fp8_e4m3_tensor\n")
    recipe = recipes.get(str(path))
    assert recipe.name == "my_fp8" and recipe.weight == fewbit.get_spec("fp8_e4m3_tensor")
    assert recipe == Recipe(name="my_fp8", weight="fp8_e4m3_tensor", input="fp8_e4m3_tensor")


def test_file_errors_name_the_file_and_the_problem(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ValueError, match=rf"recipe file {missing} does not exist"):
        recipes.get(str(missing))
    bad = tmp_path / "bad.yaml"
    bad.write_text("weight: [mxfp8\n")
    with pytest.raises(ValueError, match=rf"recipe file {bad} is not valid YAML"):
        recipes.get(str(bad))
    listed = tmp_path / "list.yml"
    listed.write_text("- fp8\n")
    with pytest.raises(ValueError, match=rf"recipe file {listed} must hold a mapping.*got list"):
        recipes.get(str(listed))
    unknown = tmp_path / "typo.yaml"
    unknown.write_text("weight: mxfp8_e4m3\nweigth_backward: mxfp8_e4m3\n")
    with pytest.raises(ValueError, match=rf"recipe file {unknown}: unknown recipe key\(s\) \['weigth_backward'\]; "
                                         r"valid: \[.*'weight_backward'.*\]"):
        recipes.get(str(unknown))
    bad_value = tmp_path / "value.yaml"
    bad_value.write_text("autocast: fp8\n")
    with pytest.raises(ValueError, match=rf"recipe file {bad_value}: recipe 'value': autocast 'fp8'"):
        recipes.get(str(bad_value))


def test_unknown_name_lists_presets_training_presets_and_files():
    with pytest.raises(ValueError, match=r"unknown recipe 'fp7'; valid: fp32, bf16, .*w4a16; training-only: "
                                         r"bf16_mixed, fp16_mixed, fp16_pure; or a path to a \.yaml/\.yml"):
        recipes.get("fp7")
    with pytest.raises(TypeError, match="got int"):
        recipes.get(7)


def test_training_fields_are_validated():
    with pytest.raises(ValueError, match="autocast 'fp8'"):
        Recipe(autocast="fp8")
    with pytest.raises(ValueError, match="param_dtype 'half'"):
        Recipe(param_dtype="half")
    # The optimizer's copy is the parameters themselves or a float32 one; never narrower than the parameters.
    with pytest.raises(ValueError, match="master_weight_dtype bfloat16 with param_dtype float32"):
        Recipe(master_weight_dtype="bfloat16")
    with pytest.raises(ValueError, match="master_weight_dtype float16 with param_dtype bfloat16"):
        Recipe(param_dtype="bfloat16", master_weight_dtype="float16")
    Recipe(param_dtype="bfloat16", master_weight_dtype="bfloat16")
    Recipe(param_dtype="float16", master_weight_dtype="float32")
    with pytest.raises(ValueError, match=r"loss_scaling 'static'; valid: none, dynamic, logmax, or a positive"):
        Recipe(loss_scaling="static")
    with pytest.raises(ValueError, match="loss_scaling -1"):
        Recipe(loss_scaling=-1)
    with pytest.raises(ValueError, match="loss_scaling True"):
        Recipe(loss_scaling=True)
    assert Recipe(loss_scaling=1024).loss_scaling == 1024
