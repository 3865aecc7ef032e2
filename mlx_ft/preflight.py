"""Preflight: everything that can fail before the first training step fails here, loudly.

Seeds 000 and 001: a model with nothing trainable, data that does not parse, examples whose tool call
would be cut by ``max_seq_length`` (mlx-lm trains on the head and drops the tail), prompts that fill
it (NaN loss), and an eval suite whose system prompt the data never uses (seed 004).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mlx_ft import data as datamod
from mlx_ft.errors import ConfigError, TrainingError
from mlx_ft.recipe import TrainConfig, lora_parameters


@dataclass
class Prepared:
    cfg: TrainConfig
    model_path: Path
    model: object
    tokenizer: object
    splits: dict[str, list[dict]]
    lengths: datamod.LengthReport
    trainable: int
    total: int
    warnings: list[str]


def prepare(cfg: TrainConfig, log: Callable[[str], None]) -> Prepared:
    """Everything that can fail before the first step does fail here, loudly."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    from mlx_ft.models import resolve_model

    splits = datamod.load_splits(cfg.data)
    for split, rows in splits.items():
        if len(rows) < cfg.batch_size:
            raise ConfigError(
                datamod.split_path(cfg.data, split),
                f"{len(rows)} example(s) but batch_size is {cfg.batch_size}; add examples or lower batch_size",
            )
    model_path = resolve_model(cfg.model, log=log)
    model, tokenizer = load(str(model_path))
    warnings = []

    lengths = datamod.length_report(splits["train"] + splits["valid"], tokenizer, cfg.max_seq_length)
    n_train = len(splits["train"])

    def where(lines: list[int]) -> str:
        named = [f"train.jsonl:{n}" if n <= n_train else f"valid.jsonl:{n - n_train}" for n in lines[:5]]
        return ", ".join(named) + (" ..." if len(lines) > 5 else "")

    if lengths.prompt_overflow:
        raise ConfigError(
            cfg.data,
            f"{len(lengths.prompt_overflow)} example(s) have a prompt of at least max_seq_length="
            f"{cfg.max_seq_length} tokens ({where(lengths.prompt_overflow)}): nothing of the answer is "
            "left to train on and mlx-lm's loss becomes NaN; raise max_seq_length or shorten the prompts",
        )
    if lengths.truncated:
        msg = (
            f"{len(lengths.truncated)} example(s) are longer than max_seq_length={cfg.max_seq_length} "
            f"(longest {lengths.max_tokens} tokens; {where(lengths.truncated)}): mlx-lm keeps only the head, "
            "cutting off the end of the answer"
        )
        if not cfg.allow_truncation:
            raise ConfigError(cfg.data, msg + "; raise max_seq_length, or pass --allow-truncation to accept it")
        warnings.append(msg)

    if cfg.eval_suite:
        from mlx_ft.suite import load_suite

        suite = load_suite(cfg.eval_suite)
        trained = datamod.system_prompts(splits["train"])
        if suite.system_prompt not in trained:
            warnings.append(
                f"the system prompt of {cfg.eval_suite} differs from every system prompt in the training data "
                f"({len(trained)} distinct); the eval will measure a prompt the model never trained on (seed 004)"
            )

    model.freeze()
    if cfg.num_layers > len(model.layers):
        raise ConfigError("config", f"num_layers: {cfg.num_layers} but the model has only {len(model.layers)} layers")
    if cfg.fine_tune_type == "full":
        for layer in model.layers[-max(cfg.num_layers, 0):]:
            layer.unfreeze()
    else:
        linear_to_lora_layers(model, cfg.num_layers, lora_parameters(cfg), use_dora=cfg.fine_tune_type == "dora")
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    if trainable == 0:
        raise TrainingError(
            "no trainable parameters: every weight is frozen, training would learn nothing (seed 001); "
            "check fine_tune_type and num_layers"
        )
    return Prepared(cfg, model_path, model, tokenizer, splits, lengths, trainable, total, warnings)
