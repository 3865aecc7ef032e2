"""Preflight: everything that can fail before the first training step fails here, loudly.

A model with nothing trainable, data that does not parse, answers the chat template renders empty
or without their tool calls, examples whose tool call would be cut by ``max_seq_length`` (mlx-lm
trains on the head and drops the tail), prompts that fill it (NaN loss), and an eval that sends
something else than what the model trained on (system prompt, tools, rendered prompt prefix).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlx.utils import tree_flatten
from mlx_lm.tuner import utils as tuner_utils
from mlx_lm.utils import load

from mlx_ft import data as datamod
from mlx_ft.errors import ConfigError, DataError, TrainingError
from mlx_ft.memory import check_memory
from mlx_ft.models import resolve_model
from mlx_ft.train_config import TrainConfig, lora_parameters
from mlx_ft.suite import load_suite


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
    splits = datamod.load_splits(cfg.data)
    for split, rows in splits.items():
        if len(rows) < cfg.batch_size:
            raise ConfigError(
                datamod.split_path(cfg.data, split),
                f"{len(rows)} example(s) but batch_size is {cfg.batch_size}; add examples or lower batch_size",
            )
    model_path = resolve_model(cfg.model, log=log)
    check_memory("train", model_path, log=log, batch_size=cfg.batch_size, seq_len=cfg.max_seq_length,
                 lora_rank=cfg.lora.rank, lora_layers=cfg.num_layers)
    model, tokenizer = load(str(model_path))
    template = f"the chat template of {model_path.name}"
    rendered = [f"{split}.jsonl {p}" for split, rows in splits.items()
                for p in datamod.answer_problems(rows, tokenizer, template)]
    if rendered:
        raise DataError(cfg.data, rendered)
    lengths, warnings = _check_lengths(cfg, splits, tokenizer)
    if cfg.eval_suite:
        suite = load_suite(cfg.eval_suite)
        warnings.extend(f"{cfg.eval_suite}: {w}" for w in compare_with_eval(splits["train"], suite, tokenizer))
    trainable, total = _make_trainable(cfg, model)
    return Prepared(cfg, model_path, model, tokenizer, splits, lengths, trainable, total, warnings)


def _check_lengths(cfg: TrainConfig, splits: dict, tokenizer) -> tuple[datamod.LengthReport, list[str]]:
    """Prompts that leave nothing to train on are refused; answers cut by max_seq_length too,
    unless allowed (then a warning)."""
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
    if not lengths.truncated:
        return lengths, []
    msg = (
        f"{len(lengths.truncated)} example(s) are longer than max_seq_length={cfg.max_seq_length} "
        f"(longest {lengths.max_tokens} tokens; {where(lengths.truncated)}): mlx-lm keeps only the head, "
        "cutting off the end of the answer"
    )
    if not cfg.allow_truncation:
        raise ConfigError(cfg.data, msg + "; raise max_seq_length, or pass --allow-truncation to accept it")
    return lengths, [msg]


def _make_trainable(cfg: TrainConfig, model) -> tuple[int, int]:
    """Freeze the model, then open what the config trains; (trainable, total) parameters."""
    model.freeze()
    if cfg.num_layers > len(model.layers):
        raise ConfigError("config", f"num_layers: {cfg.num_layers} but the model has only {len(model.layers)} layers")
    if cfg.fine_tune_type == "full":
        for layer in model.layers[-max(cfg.num_layers, 0):]:
            layer.unfreeze()
    else:
        try:
            tuner_utils.linear_to_lora_layers(model, cfg.num_layers, lora_parameters(cfg),
                                              use_dora=cfg.fine_tune_type == "dora")
        except ValueError as e:  # e.g. "QuantizedSwitchLinear doesn't support DoRA yet."
            raise ConfigError("config", f"fine_tune_type: {cfg.fine_tune_type} cannot adapt this model ({e}); "
                                        "use fine_tune_type: lora") from None
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    if trainable == 0:
        raise TrainingError(
            "no trainable parameters: every weight is frozen, training would learn nothing; "
            "check fine_tune_type and num_layers"
        )
    return trainable, total


def eval_mismatches(run_dir: Path, suite) -> list[str]:
    """``mlxft eval --run``'s check: what the run trained on (its data, rendered by its model's chat
    template) against what this suite sends. Warnings only; none when the data is gone."""
    from mlx_lm.utils import load_tokenizer

    from mlx_ft import runs

    run = runs.read_run(run_dir)
    train_file = datamod.split_path(run["config"]["data"], "train")
    if not train_file.is_file():
        return []
    rows = datamod.load_chat_jsonl(train_file)
    return compare_with_eval(rows, suite, load_tokenizer(Path(run["model_path"])))


def compare_with_eval(rows: list[dict], suite, tokenizer) -> list[str]:
    """Warnings where the eval sends something else than the training data showed the model: the
    system prompt, the tools (names and schemas), the rendered prompt before the user's request.
    Each names the first differing line, so an eval-only suffix on the system prompt is found."""
    if not rows or not suite.prompts:
        return []
    suite = suite.bind(tokenizer) if hasattr(suite, "bind") else suite
    prompt = suite.prompts[0]
    sent, tools = suite.messages(prompt), suite.tools(prompt)
    row = _closest(rows, sent)
    warnings = []
    trained_system = _system(row["messages"])
    eval_system = _system(sent)
    if eval_system not in datamod.system_prompts(rows) | ({""} if not trained_system else set()):
        warnings.append(f"the system prompt differs from the training data's: {first_difference(trained_system, eval_system)}")
    warnings.extend(_compare_tools(rows, suite.schemas() if getattr(suite, "native", False) else tools))
    if not warnings:
        a = _prefix(tokenizer, row["messages"], row.get("tools"))
        b = _prefix(tokenizer, sent, tools)
        if a is not None and b is not None and a != b:
            warnings.append(f"the rendered prompt before the user's request differs: {first_difference(a, b)}")
    return [w + "; the eval would measure a prompt the model never trained on" for w in warnings]


def first_difference(trained: str, sent: str) -> str:
    """'line N: trained <line>, eval sends <line>' for the first line that differs."""
    a, b = trained.splitlines() or [""], sent.splitlines() or [""]
    for n in range(max(len(a), len(b))):
        x = a[n] if n < len(a) else "<nothing>"
        y = b[n] if n < len(b) else "<nothing>"
        if x != y:
            return f"line {n + 1}: trained {x[:120]!r}, eval sends {y[:120]!r}"
    return "they differ in whitespace only"


def _system(messages: list[dict]) -> str:
    return datamod.system_prompts([{"messages": messages}]).pop() if messages[0].get("role") == "system" else ""


def _closest(rows: list[dict], sent: list[dict]) -> dict:
    """The training row whose system prompt is the eval's, else the most common one's first row."""
    system = _system(sent)
    same = [r for r in rows if _system(r["messages"]) == system]
    if same:
        return same[0]
    counts: dict[str, int] = {}
    for r in rows:
        counts[_system(r["messages"])] = counts.get(_system(r["messages"]), 0) + 1
    common = max(counts, key=counts.get)
    return next(r for r in rows if _system(r["messages"]) == common)


def _compare_tools(rows: list[dict], sent: list[dict] | None) -> list[str]:
    trained: dict[str, dict] = {}
    for r in rows:
        for t in r.get("tools") or []:
            fn = t.get("function", t)
            trained.setdefault(fn.get("name"), fn)
    eval_tools = {(t.get("function", t)).get("name"): t.get("function", t) for t in sent or []}
    if not trained or not eval_tools:
        if trained and not eval_tools:
            return [(f"the training data lists tools ({', '.join(sorted(trained)[:5])}) but the eval sends none; "
                    "declare them in the suite as JSON schemas")]
        if eval_tools and not trained:
            return ["the eval sends tools but no training example has a 'tools' list"]
        return []
    out = []
    missing, extra = sorted(set(trained) - set(eval_tools)), sorted(set(eval_tools) - set(trained))
    if missing or extra:
        out.append(f"the tools differ: trained only {missing or 'none'}, eval only {extra or 'none'}")
    for name in sorted(set(trained) & set(eval_tools)):
        a, b = json.dumps(trained[name], indent=1, sort_keys=True), json.dumps(eval_tools[name], indent=1, sort_keys=True)
        if a != b:
            out.append(f"the schema of tool {name} differs: {first_difference(a, b)}")
            break
    return out


def _prefix(tokenizer, messages: list[dict], tools: list[dict] | None) -> str | None:
    """The rendered chat up to the first user request's text."""
    k = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
    if k is None:
        return None
    try:
        text = tokenizer.apply_chat_template(messages[:k + 1], tools=tools, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that fails here fails loudly in training
        return None
    user = datamod.text_of(messages[k].get("content"))
    at = text.rfind(user) if user else -1
    return text[:at] if at != -1 else None
