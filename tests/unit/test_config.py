"""Bad params fail before any work, with one line naming the dotted key.

Loader checks (unknown keys, wrong types, cross-field checks in ``validate``) and the device/launch checks of
:func:`markup2image.training.launch.preflight`, which pretends other machines through its ``gpus`` argument.
"""

import logging

import pytest
import yaml

from markup2image.config import ConfigError, load_params, params_from_dict
from markup2image.training.launch import effective_mixed_precision, preflight
from markup2image.training.synthetic import tiny_params_dict


def _raw(**train) -> dict:
    return tiny_params_dict(**train)


def _fails(raw: dict, key: str) -> str:
    with pytest.raises(ConfigError) as err:
        params_from_dict(raw)
    msg = str(err.value)
    assert msg.startswith(f"{key}:"), msg
    assert "\n" not in msg  # one line
    return msg


# -- loading ------------------------------------------------------------------------------------------------------


def test_valid_params_load_and_lambda_maps_to_a_field():
    p = params_from_dict({**_raw(), "lambda": 0.01})
    assert p.lambda_ == 0.01 and p.train.batch_size == 4 and p.model.block_out_channels == (8, 16)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"lamda": 0.1}, "lamda"),
        ({"train": {"lrr": 0.1}}, "train.lrr"),
        ({"model": {"fsa_channel": [8]}}, "model.fsa_channel"),
        ({"domain": {"math": {"hieght": 16}}}, "domain.math.hieght"),
    ],
)
def test_unknown_keys_name_the_dotted_key(raw, key):
    msg = _fails(raw, key)
    assert "unknown params key" in msg


def test_unknown_key_lists_the_known_ones_with_lambda_spelled_as_in_params():
    msg = _fails({"lamda": 0.1}, "lamda")
    assert "lambda" in msg and "lambda_" not in msg


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"train": {"steps": "ten"}}, "train.steps"),
        ({"train": {"steps": True}}, "train.steps"),  # a bool is not an int
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"cpu": "yes"}}, "train.cpu"),
        ({"model": {"block_out_channels": 8}}, "model.block_out_channels"),
        ({"model": {"block_out_channels": [8, "x"]}}, "model.block_out_channels[1]"),
        ({"train": "fast"}, "train"),
    ],
)
def test_wrong_types_name_the_key(raw, key):
    _fails(raw, key)


def test_int_is_accepted_for_a_float():
    assert params_from_dict({"train": {"lr": 1}}).train.lr == 1.0


def test_unknown_objective_names_the_key():
    msg = _fails(_raw(objective="ddim"), "train.objective")
    assert "fsa_cdm" in msg  # lists the choices


def test_dvc_yaml12_no_reads_as_mixed_precision_no(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params_dict()).replace("train:\n", "train:\n  mixed_precision: no\n"))
    assert load_params(path).train.mixed_precision == "no"


def test_missing_params_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


# -- cross-field checks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("train", "ok"),
    [
        ({"batch_size": 8, "num_processes": 2, "grad_accum": 2}, True),
        ({"batch_size": 8, "num_processes": 3}, False),
        ({"batch_size": 8, "num_processes": 2, "grad_accum": 3}, False),
        ({"batch_size": 6, "num_processes": 1, "grad_accum": 4}, False),
    ],
)
def test_batch_must_split_into_processes_times_grad_accum(train, ok):
    if ok:
        params_from_dict(_raw(**train))
    else:
        msg = _fails(_raw(**train), "train.batch_size")
        assert "processes x train.grad_accum" in msg


def _with_con_aug(raw: dict, on: bool) -> dict:
    raw["model"] = {**raw.get("model", {}), "con_aug": on}
    return raw


@pytest.mark.parametrize("objective", ["cdcd", "fsa_cdm"])
def test_negatives_need_a_larger_global_micro_batch(objective):
    # 16 / 2 accum = 8 items per global micro-batch (negatives come from every process's share): K = 8 is too
    # many, K = 7 fits although each of the 4 processes holds only 2 items (the paper's music setting: 8 / 4, K 5)
    con_aug = objective == "fsa_cdm"
    split = {"batch_size": 16, "num_processes": 4, "grad_accum": 2}
    _fails(_with_con_aug(_raw(objective=objective, **split, num_negatives=8), con_aug), "train.num_negatives")
    params_from_dict(_with_con_aug(_raw(objective=objective, **split, num_negatives=7), con_aug))


def test_negatives_are_not_checked_for_objectives_without_them():
    params_from_dict(_raw(objective="ddpm", batch_size=4, num_negatives=5))
    # fsa_cdm draws negatives only for the contrast-augmented terms
    params_from_dict(_with_con_aug(_raw(objective="fsa_cdm", batch_size=4, num_negatives=5), False))


@pytest.mark.parametrize(
    ("train", "key"),
    [
        ({"steps": 0}, "train.steps"),
        ({"grad_accum": 0}, "train.grad_accum"),
        ({"num_processes": 0}, "train.num_processes"),
        ({"checkpoint_every": 0}, "train.checkpoint_every"),
        ({"sample_every": -1}, "train.sample_every"),
        ({"keep_checkpoints": -1}, "train.keep_checkpoints"),
    ],
)
def test_counts_out_of_range(train, key):
    _fails(_raw(**train), key)


# -- device and launch checks (preflight) -------------------------------------------------------------------------


def _preflight_fails(key: str, **kw) -> str:
    params = params_from_dict(_raw(**kw.pop("train", {})))
    with pytest.raises(ConfigError) as err:
        preflight(params, **kw)
    msg = str(err.value)
    assert msg.startswith(f"{key}:") and "\n" not in msg, msg
    return msg


def test_fp16_on_cpu_fails():
    msg = _preflight_fails("train.mixed_precision", train={"mixed_precision": "fp16"}, gpus=0)
    assert "GPU" in msg
    _preflight_fails("train.mixed_precision", train={"mixed_precision": "fp16", "cpu": True}, gpus=4)


def test_bf16_on_cpu_falls_back_to_fp32_with_a_warning(caplog):
    params = params_from_dict(_raw(mixed_precision="bf16"))
    with caplog.at_level(logging.WARNING):
        plan = preflight(params, gpus=0)
    assert plan.mixed_precision == "no" and plan.cpu
    assert "train.mixed_precision=bf16" in caplog.text and "fp32" in caplog.text


def test_bf16_on_a_gpu_without_bf16_fails_and_with_it_runs():
    _preflight_fails("train.mixed_precision", train={"mixed_precision": "bf16"}, gpus=1, bf16_supported=False)
    assert (
        preflight(params_from_dict(_raw(mixed_precision="bf16")), gpus=1, bf16_supported=True).mixed_precision
        == "bf16"
    )
    assert effective_mixed_precision("fp16", cpu=False) == "fp16"


def test_more_processes_than_gpus_fails_unless_cpu_processes_are_asked_for():
    msg = _preflight_fails("train.num_processes", train={"num_processes": 2}, gpus=1)
    assert "train.cpu" in msg  # says what to do
    plan = preflight(params_from_dict(_raw(num_processes=2, cpu=True)), gpus=1)
    assert plan.cpu and plan.processes == 2
    assert preflight(params_from_dict(_raw(num_processes=2)), gpus=0).cpu  # no GPU at all: gloo CPU processes


def test_accelerate_config_is_checked_against_batch_and_gpus(tmp_path):
    cfg = tmp_path / "acc.yaml"
    cfg.write_text(yaml.safe_dump({"distributed_type": "MULTI_GPU", "num_processes": 6, "num_machines": 2}))
    msg = _preflight_fails("train.batch_size", train={"accelerate_config": str(cfg), "batch_size": 8}, gpus=8)
    assert "(6 x 1)" in msg  # the file's process count, not train.num_processes
    _preflight_fails("train.accelerate_config", train={"accelerate_config": str(cfg), "batch_size": 12}, gpus=2)
    assert preflight(params_from_dict(_raw(accelerate_config=str(cfg), batch_size=12)), gpus=3).processes == 6
    _preflight_fails("train.accelerate_config", train={"accelerate_config": str(tmp_path / "missing.yaml")}, gpus=1)
    cfg.write_text(yaml.safe_dump({"distributed_type": "DEEPSPEED", "num_processes": 2}))
    _preflight_fails("train.accelerate_config", train={"accelerate_config": str(cfg)}, gpus=2)


@pytest.mark.parametrize("switch", ["fsa", "con_aug"])
def test_fsa_cdm_parts_need_the_fsa_cdm_objective(switch):
    raw = _raw(objective="ddpm")
    raw["model"][switch] = True
    msg = _fails(raw, f"model.{switch}")
    assert "fsa_cdm" in msg
    raw["train"] |= {"objective": "fsa_cdm", "batch_size": 8, "num_negatives": 2}
    assert getattr(params_from_dict(raw).model, switch)


@pytest.mark.parametrize("patch", [0, 5])
def test_patch_size_must_be_positive_and_divide_every_domain_image(patch):
    raw = _raw()
    raw["model"] = {**raw["model"], "patch_size": patch}
    msg = _fails(raw, "model.patch_size")
    assert ("at least 1" in msg) if patch == 0 else ("does not divide" in msg and "divisor" in msg)


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("timestep_sampling", "cosmap", "logit_normal"),  # a scheme diffusers has but this option does not: listed
        ("timestep_shift", 0.0, "> 0"),
        ("timestep_logit_std", -1.0, "> 0"),
    ],
)
def test_timestep_sampling_keys_are_checked(key, value, words):
    raw = _raw()
    raw["diffusion"] = {**raw.get("diffusion", {}), key: value}
    assert words in _fails(raw, f"diffusion.{key}")
