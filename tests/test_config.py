"""Config: JSON round trip, --set overrides (including list indices), validation errors that name the key."""

import json

import pytest

from latentwire import config as C

ROOT_CFG = "configs/tiny.json"


def test_round_trip(tmp_path):
    cfg = C.load_config(ROOT_CFG)
    C.save_config(cfg, tmp_path / "c.json")
    again = C.load_config(tmp_path / "c.json")
    assert C.to_dict(again) == C.to_dict(cfg)


def test_overrides_types_and_list_index():
    cfg = C.load_config(ROOT_CFG, ["train.max_steps=7", "receivers.1.path=/models/q", "losses.kd_temperature=2",
                                   "features.lora=true", "eval.precisions=[\"int8\"]", "receivers.0.anchor=A:"])
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.receivers[1].path == "/models/q"
    assert cfg.losses.kd_temperature == 2.0 and isinstance(cfg.losses.kd_temperature, float)
    assert cfg.features.lora is True
    assert cfg.eval.precisions == ["int8"]
    assert cfg.receivers[0].anchor == "A:"


def test_feature_toggles_default_off():
    toggles = {k: v for k, v in C.to_dict(C.FeaturesConfig()).items() if isinstance(v, bool)}
    assert set(toggles) == {"lora", "deep_prefix", "latent_adapters", "coprocessor"}
    assert not any(toggles.values())


def test_unknown_key_suggests_closest():
    with pytest.raises(C.ConfigError, match=r"unknown config key 'train\.max_step'.*did you mean 'train\.max_steps'"):
        C.load_config(ROOT_CFG, ["train.max_step=3"])


def test_unknown_top_level_key_in_file(tmp_path):
    data = json.loads(open(ROOT_CFG).read())
    data["recievers"] = data.pop("receivers")
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(C.ConfigError, match="did you mean 'receivers'"):
        C.load_config(tmp_path / "bad.json")


def test_wrong_type_names_key():
    with pytest.raises(C.ConfigError, match=r"train\.micro_batch: expected an integer"):
        C.load_config(ROOT_CFG, ["train.micro_batch=two"])


def test_bad_choice_lists_accepted_values():
    with pytest.raises(C.ConfigError, match=r"receivers\.0\.dtype: 'float8' is not one of float32, bfloat16, float16"):
        C.load_config(ROOT_CFG, ["receivers.0.dtype=float8"])


def test_incompatible_features_name_both():
    with pytest.raises(C.ConfigError, match="deep_prefix.*coprocessor"):
        C.load_config(ROOT_CFG, ["features.deep_prefix=true", "features.coprocessor=true"])


def test_list_index_past_end():
    with pytest.raises(C.ConfigError, match="index 5 is past the end of 'receivers'"):
        C.load_config(ROOT_CFG, ["receivers.5.path=x"])


def test_duplicate_receiver_names():
    with pytest.raises(C.ConfigError, match="names must be unique"):
        C.load_config(ROOT_CFG, ["receivers.1.name=llama"])


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(C.ConfigError, match="config file not found"):
        C.load_config(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(C.ConfigError, match="not valid JSON"):
        C.load_config(tmp_path / "broken.json")


def test_diff_configs_lists_changed_keys():
    a = C.to_dict(C.load_config(ROOT_CFG))
    b = C.to_dict(C.load_config(ROOT_CFG, ["losses.kd_weight=0.1"]))
    assert C.diff_configs(a, b) == ["losses.kd_weight: 0.5 -> 0.1"]


def test_every_bench_step_preset_resolves(tmp_path):
    """launch/bench_step.py times steps with evaluation off: each preset must still load (the toy preset's data
    stage is left on validation, so the benchmark drops it rather than fail on eval.every=0)."""
    from launch import bench_step

    for preset in bench_step.PRESETS:
        cfg = bench_step.preset_config(preset, tmp_path, [])
        assert cfg.eval.every == 0 and not cfg.curriculum.data_stages, preset
