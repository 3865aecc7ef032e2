"""What defines a training run: the YAML recipe as frozen dataclasses, and the adapter config
that ``mlx_lm.load(base, adapter_path=...)`` reads back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mlx_ft import configfile as cfgmod


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0

    def check(self) -> list[str]:
        problems = []
        if self.rank < 1:
            problems.append(f"rank: must be at least 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout: must be in [0, 1), got {self.dropout}")
        return problems


@dataclass(frozen=True)
class EarlyStop:
    """Stop training when ``patience`` checkpoints in a row bring no new best eval ``metric``."""

    metric: Literal["score", "strict"] = "score"
    patience: int = 0  # 0: off

    def check(self) -> list[str]:
        return [f"patience: must be >= 0 (0 turns early stop off), got {self.patience}"] if self.patience < 0 else []


@dataclass(frozen=True)
class FuseStage:
    """``mlxft run``'s fuse stage: skipped unless ``bits`` is set."""

    bits: int | None = None
    group_size: int = 32
    out: str | None = None  # default fused_models/<run name>-<bits>bit
    dtype: str = "auto"  # of the scales, biases, unquantized tensors: auto (the base's 16-bit dtype), float16, ...

    def check(self) -> list[str]:
        dtypes = ("auto", "float16", "bfloat16", "float32")
        return [] if self.dtype in dtypes else [f"dtype: one of {', '.join(dtypes)}, got {self.dtype!r}"]


@dataclass(frozen=True)
class PickStage:
    """``mlxft run``'s pick-best options (as ``mlxft pick-best``'s flags)."""

    metric: Literal["score", "strict"] = "score"
    guard: str | None = None  # e.g. bfcl:simple_python, evaluated by mlxft run before picking
    alpha: float = 0.05

    def check(self) -> list[str]:
        return [] if 0 < self.alpha < 1 else [f"alpha: must be between 0 and 1, got {self.alpha}"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. Saved resolved in ``run.json``."""

    name: str = "demo"
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct, imported once
    data: str = "data/tools"
    runs_dir: str = "runs"
    fine_tune_type: Literal["lora", "dora", "full"] = "lora"
    num_layers: int = 8
    lora: LoraConfig = field(default_factory=LoraConfig)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = 1e-4
    iters: int = 100
    batch_size: int = 4
    grad_accumulation: int = 1
    seed: int = 0
    max_seq_length: int = 2048
    save_every: int = 25
    mask_prompt: bool = True
    allow_truncation: bool = False
    grad_checkpoint: bool = False
    divergence_factor: float = 3.0  # stop when the recent loss mean exceeds this × the first
    eval_suite: str | None = None  # scored in the loop; also checked against the training data
    eval_during_training: bool = False  # score base + checkpoints on eval_suite in the training process
    early_stop: EarlyStop = field(default_factory=EarlyStop)
    pick: PickStage = field(default_factory=PickStage)  # mlxft run only
    fuse: FuseStage = field(default_factory=FuseStage)  # mlxft run only

    def check(self) -> list[str]:
        p = []
        for key in ("iters", "batch_size", "save_every", "grad_accumulation", "max_seq_length"):
            if getattr(self, key) < 1:
                p.append(f"{key}: must be a positive integer, got {getattr(self, key)}")
        if self.num_layers < 1 and self.num_layers != -1:
            p.append(f"num_layers: must be positive (or -1 for all layers), got {self.num_layers}")
        if not self.learning_rate > 0:
            p.append(f"learning_rate: must be > 0, got {self.learning_rate}")
        if self.seed < 0:
            p.append(f"seed: must be >= 0, got {self.seed}")
        if self.divergence_factor <= 1:
            p.append(f"divergence_factor: must be > 1, got {self.divergence_factor}")
        if (self.eval_during_training or self.early_stop.patience) and not self.eval_suite:
            p.append("eval_during_training / early_stop: need eval_suite (the suite to score checkpoints on)")
        if self.early_stop.patience and not self.eval_during_training:
            p.append("early_stop: needs eval_during_training: true (it stops on the in-loop eval score)")
        if not self.name or "/" in self.name or self.name.startswith("."):
            p.append(f"name: {self.name!r} must be a plain folder name")
        return p

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def load_config(path: str | Path | None, overrides: dict | None = None) -> TrainConfig:
    """YAML file (optional) with CLI overrides on top; every problem reported at once."""
    data = cfgmod.read_yaml(path) if path else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    return cfgmod.build(TrainConfig, data, path or "command line")



def lora_parameters(cfg: TrainConfig) -> dict:
    return {"rank": cfg.lora.rank, "scale": cfg.lora.scale, "dropout": cfg.lora.dropout}


def adapter_config(cfg: TrainConfig, model_path: Path) -> dict:
    """What ``mlx_lm.load(adapter_path=...)`` reads (plus the base path, absolute)."""
    return {
        "model": str(Path(model_path).resolve()),
        "fine_tune_type": cfg.fine_tune_type,
        "num_layers": cfg.num_layers,
        "lora_parameters": lora_parameters(cfg) if cfg.fine_tune_type != "full" else None,
    }
