"""Eval suite files: versioned YAML, loaded into frozen dataclasses, every problem at once.

A suite names the system prompt (the one the model was trained with -- seed 004 lost points to a
``_direct`` suffix that only the eval had), the tools, generation settings, the rubric and the
prompts. ``<think>`` is always among the stop sequences: a suite cannot forget it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from mlx_ft import config as cfgmod
from mlx_ft.errors import ConfigError

FORMAT = "mlxft-suite/1"
ALWAYS_STOP = ("<think>",)


@dataclass(frozen=True)
class Tool:
    name: str
    params: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class Generation:
    temperature: float = 0.0
    max_tokens: int = 96
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    def check(self) -> list[str]:
        p = []
        if self.max_tokens < 1:
            p.append(f"max_tokens: must be positive, got {self.max_tokens}")
        if self.temperature < 0:
            p.append(f"temperature: must be >= 0, got {self.temperature}")
        return p

    @property
    def stop_sequences(self) -> list[str]:
        return list(dict.fromkeys([*self.stop, *ALWAYS_STOP]))


@dataclass(frozen=True)
class Rubric:
    """Score for each level of the seed's rubric; the wrapper's name is a setting, not code."""

    wrapper: str | None = "execute_code"
    wrapped: float = 1.0  # the expected tool called inside the wrapper's code
    direct: float = 0.5  # the expected tool called directly, without the wrapper
    other: float = 0.0  # prose, no call, wrong tool, broken JSON

    def check(self) -> list[str]:
        p = []
        for k in ("wrapped", "direct", "other"):
            v = getattr(self, k)
            if not 0 <= v <= 1:
                p.append(f"{k}: must be between 0 and 1, got {v}")
        if not self.other <= self.direct <= self.wrapped:
            p.append(f"weights must satisfy other <= direct <= wrapped, got {self.other}, {self.direct}, {self.wrapped}")
        return p


@dataclass(frozen=True)
class Expect:
    tool: str
    alternatives: tuple[str, ...] = ()
    # argument -> accepted values (an empty list accepts any value; the key being present is what counts)
    args: dict = field(default_factory=dict)

    def check(self) -> list[str]:
        p = []
        for k, v in self.args.items():
            if not isinstance(v, list):
                p.append(f"args.{k}: expected a list of accepted values (or []), got {v!r}")
        return p

    @property
    def tools(self) -> tuple[str, ...]:
        return (self.tool, *self.alternatives)


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    user: str
    expect: Expect

    def check(self) -> list[str]:
        return [] if self.user.strip() else ["user: the user message is empty"]


@dataclass(frozen=True)
class Suite:
    name: str
    format: str
    system_prompt: str
    tools: tuple[Tool, ...]
    prompts: tuple[Prompt, ...]
    generation: Generation = field(default_factory=Generation)
    rubric: Rubric = field(default_factory=Rubric)
    path: str = ""
    kind: Literal["tools", "bfcl"] = "tools"

    @property
    def tool_names(self) -> set[str]:
        return {t.name for t in self.tools}

    def params_of(self, tool: str) -> tuple[str, ...]:
        return next((t.params for t in self.tools if t.name == tool), ())

    def fingerprint(self) -> str:
        """Hash of everything that changes a score, so results from an edited suite are not mixed."""
        blob = json.dumps(
            {"kind": self.kind, "system": self.system_prompt, "gen": asdict(self.generation),
             "rubric": asdict(self.rubric), "prompts": [asdict(p) for p in self.prompts]},
            sort_keys=True, default=list,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def messages(self, prompt) -> list[dict]:
        """The chat sent for one prompt: the suite's system prompt and the user's request."""
        if self.kind == "bfcl":
            from mlx_ft import bfcl

            return bfcl.messages(prompt)
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt.user}]


def load_suite(path: str | Path) -> Suite:
    """Load and validate a suite file. Raises one ConfigError listing every problem."""
    path = Path(path)
    raw = cfgmod.read_yaml(path)
    problems: list[str] = []
    tools, prompts = [], []
    for i, t in enumerate(raw.get("tools") or []):
        if isinstance(t, dict):
            tools.append(cfgmod.collect(Tool, t, f"tools[{i}].", problems))
        else:
            problems.append(f"tools[{i}]: expected a mapping with name and params, got {t!r}")
    for i, p in enumerate(raw.get("prompts") or []):
        label = f"prompts[{i}]" + (f" ({p.get('id')})" if isinstance(p, dict) and p.get("id") else "")
        if not isinstance(p, dict):
            problems.append(f"{label}: expected a mapping, got {p!r}")
            continue
        if not isinstance(p.get("expect"), dict):
            problems.append(f"{label}.expect: required mapping with at least 'tool'")
            continue
        prompts.append(cfgmod.collect(Prompt, {**p, "expect": p["expect"]}, f"{label}.", problems))
    head = {k: v for k, v in raw.items() if k not in ("tools", "prompts")}
    suite = cfgmod.collect(Suite, {**head, "tools": (), "prompts": ()}, "", problems)
    if "format" in raw and raw["format"] != FORMAT:
        problems.append(f"format: {raw['format']!r} is not supported; this mlxft reads {FORMAT!r}")
    if not raw.get("tools"):
        problems.append("tools: required, a list of {name, params}")
    if not raw.get("prompts"):
        problems.append("prompts: required, a non-empty list")
    names = [t.name for t in tools if t]
    seen: set[str] = set()
    for p in prompts:
        if p is None:
            continue
        if p.id in seen:
            problems.append(f"prompts: duplicate id {p.id!r}; ids must be unique")
        seen.add(p.id)
        for tool in p.expect.tools:
            if tool not in names:
                problems.append(f"prompts ({p.id}).expect: tool {tool!r} is not in the suite's tools list")
        params = next((t.params for t in tools if t and t.name == p.expect.tool), ())
        for arg in p.expect.args:
            if params and arg not in params:
                problems.append(f"prompts ({p.id}).expect.args: {arg!r} is not a parameter of {p.expect.tool}")
    rubric = suite.rubric if suite else None
    if rubric and rubric.wrapper and rubric.wrapper in names:
        problems.append(f"rubric.wrapper: {rubric.wrapper!r} must not also be listed as a tool")
    if problems:
        raise ConfigError(path, problems)
    return Suite(**{**suite.__dict__, "tools": tuple(tools), "prompts": tuple(prompts), "path": str(path)})
