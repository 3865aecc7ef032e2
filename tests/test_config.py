from __future__ import annotations

import pytest

from mlx_ft.errors import ConfigError
from mlx_ft.train import TrainConfig, load_config


def write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_numbers_from_yaml_strings_are_coerced(tmp_path):
    cfg = load_config(write(tmp_path, "learning_rate: 1e-5\niters: '20'\nlora: {rank: 4}\n"))
    assert cfg.learning_rate == 1e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.iters == 20 and cfg.lora.rank == 4


def test_seed_zero_is_honoured(tmp_path):
    assert load_config(write(tmp_path, "seed: 0\n"), {"seed": None}).seed == 0
    assert load_config(None, {"seed": 0}).seed == 0


def test_cli_overrides_yaml(tmp_path):
    cfg = load_config(write(tmp_path, "iters: 10\nbatch_size: 2\n"), {"iters": 30})
    assert (cfg.iters, cfg.batch_size) == (30, 2)


def test_mask_prompt_on_by_default():
    assert TrainConfig().mask_prompt is True


def test_all_problems_at_once_with_file_and_key(tmp_path):
    p = write(tmp_path, "learning_rat: 1e-4\niters: 0\nsave_every: -5\nbatch_size: four\nlora: {rank: 0}\n"
                        "fine_tune_type: qlora\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    text = str(e.value)
    assert str(p) in text
    for needle in ("learning_rat: unknown key", "did you mean 'learning_rate'", "batch_size: expected an integer",
                   "fine_tune_type: 'qlora' is not one of"):
        assert needle in text, needle


def test_range_checks(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "iters: 0\nsave_every: -5\nlearning_rate: 0\n"))
    text = str(e.value)
    assert "iters: must be a positive integer" in text and "save_every" in text and "learning_rate" in text
