"""Eval suite files: versioned YAML, loaded into frozen dataclasses, every problem at once.

A suite names the system prompt (the one the model was trained with: an eval-only suffix on it
costs points the model never had a chance to earn), the tools, generation settings, the rubric and
the prompts. Tools come in two forms: ``{name, params}`` (not shown to the model: the system prompt
describes them, or they are functions called inside the rubric's wrapper) and OpenAI function
schemas ``{name, description, parameters}`` (optionally wrapped as ``{type: function, function:
{...}}``), rendered by the chat template's ``tools`` exactly as mlx-lm renders ``{"messages",
"tools"}`` training data. The wrapper (``execute_code``) may be given as such a schema, next to the
``{name, params}`` functions called inside it. ``<think>`` is always among the stop sequences.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlx_ft import configfile as cfgmod
from mlx_ft.errors import ConfigError
from mlx_ft.scoring import Expect, Rubric, Score, judge
from mlx_ft.task import Task, check_format, digest, openai_tools, tools_in_system

__all__ = ["ALWAYS_STOP", "FORMAT", "Expect", "Generation", "Prompt", "Rubric", "Suite", "Tool", "load_suite"]

FORMAT = "mlxft-suite/1"
ALWAYS_STOP = ("<think>",)


@dataclass(frozen=True)
class Tool:
    name: str
    params: tuple[str, ...] = ()
    description: str = ""
    parameters: dict | None = None  # JSON schema (type: object, properties, required): a native tool

    def check(self) -> list[str]:
        s = self.parameters
        if s is None:
            return []
        if s.get("type", "object") != "object" or not isinstance(s.get("properties", {}), dict):
            return ["parameters: must be a JSON schema {type: object, properties: {...}, required: [...]}"]
        missing = [r for r in s.get("required", []) if r not in s.get("properties", {})]
        return [f"parameters.required: {missing} not among its properties"] if missing else []

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple((self.parameters or {}).get("properties", {})) if self.parameters is not None else self.params

    def schema(self) -> dict:
        params = self.parameters if self.parameters is not None else {
            "type": "object", "properties": {p: {"type": "string"} for p in self.params}, "required": list(self.params)}
        return {"name": self.name, "description": self.description, "parameters": params}


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
class Prompt:
    id: str
    category: str
    user: str
    expect: Expect

    def check(self) -> list[str]:
        return [] if self.user.strip() else ["user: the user message is empty"]


@dataclass(frozen=True)
class Suite(Task):
    """The tools task: one user request per prompt, judged by the rubric (wrapped / direct / other)."""

    name: str
    format: str
    system_prompt: str
    toolset: tuple[Tool, ...]  # the YAML's ``tools``
    prompts: tuple[Prompt, ...]
    generation: Generation = field(default_factory=Generation)
    rubric: Rubric = field(default_factory=Rubric)
    path: str = ""
    tool_format: str = "auto"  # auto (the model's own parser) | json | qwen3_coder | ... (parsers.names())
    tool_render: str = "none"  # template | system_prompt (native tools) | none ({name, params} tools)

    @property
    def tool_names(self) -> set[str]:
        return {t.name for t in self.toolset}

    @property
    def native(self) -> bool:
        return self.tool_render != "none"

    def params_of(self, tool: str) -> tuple[str, ...]:
        return next((t.arg_names for t in self.toolset if t.name == tool), ())

    def schemas(self) -> list[dict]:
        """The tools the model is shown: the JSON-schema entries."""
        return openai_tools([t.schema() for t in self.toolset if t.parameters is not None])

    def digest(self) -> str:
        """Hash of everything that changes a score, so results from an edited suite are not mixed."""
        blob = {"kind": "tools", "system": self.system_prompt, "gen": asdict(self.generation),
                "rubric": asdict(self.rubric), "prompts": [asdict(p) for p in self.prompts]}
        if self.native or self.tool_format != "auto":  # suites of the first format keep their digest
            blob.update(tools=self.schemas(), render=self.tool_render, tool_format=self.tool_format)
        return digest(blob)

    def messages(self, prompt: Prompt) -> list[dict]:
        """The chat sent for one prompt: the suite's system prompt and the user's request."""
        system = tools_in_system(self.system_prompt, self.schemas()) if self.tool_render == "system_prompt" \
            else self.system_prompt
        return [{"role": "system", "content": system}, {"role": "user", "content": prompt.user}]

    def tools(self, prompt: Prompt | None = None) -> list[dict] | None:
        return self.schemas() if self.tool_render == "template" else None

    def score(self, prompt: Prompt, text: str | None, finish_reason: str | None, error: str | None,
              parser: Any) -> Score:
        params = {t.name: t.arg_names for t in self.toolset}
        return judge(self.rubric, params, prompt.expect, text, finish_reason, error, parser,
                     self.generation.max_tokens, self.schemas() if self.native else None)


@dataclass(frozen=True)
class _File:
    """The top-level keys of a suite file (``tools`` and ``prompts`` are checked item by item)."""

    name: str
    format: str
    system_prompt: str
    tools: tuple = ()
    prompts: tuple = ()
    generation: Generation = field(default_factory=Generation)
    rubric: Rubric = field(default_factory=Rubric)
    tool_format: str = "auto"

    def check(self) -> list[str]:
        return check_format(self.tool_format)


def _tool(i: int, t: Any, problems: list[str]) -> Tool | None:
    if not isinstance(t, dict):
        problems.append(f"tools[{i}]: expected a mapping ({{name, params}} or a JSON schema), got {t!r}")
        return None
    if t.get("type") == "function" and isinstance(t.get("function"), dict):
        t = t["function"]
    if "parameters" in t and "params" in t:
        problems.append(f"tools[{i}]: give either params (a list of names) or parameters (a JSON schema), not both")
        return None
    return cfgmod.collect(Tool, t, f"tools[{i}].", problems)


def load_suite(path: str | Path) -> Suite:
    """Load and validate a suite file. Raises one ConfigError listing every problem."""
    path = Path(path)
    raw = cfgmod.read_yaml(path)
    problems: list[str] = []
    head = cfgmod.collect(_File, {**raw, "tools": (), "prompts": ()}, "", problems)  # first: it checks itself
    tools = [_tool(i, t, problems) for i, t in enumerate(raw.get("tools") or [])]
    prompts = _prompts(raw, problems)
    if "format" in raw and raw["format"] != FORMAT:
        problems.append(f"format: {raw['format']!r} is not supported; this mlxft reads {FORMAT!r}")
    if not raw.get("tools"):
        problems.append("tools: required, a list of {name, params} or of JSON schemas {name, description, parameters}")
    if not raw.get("prompts"):
        problems.append("prompts: required, a non-empty list")
    tools = [t for t in tools if t]
    prompts = [p for p in prompts if p is not None]
    _check_expectations(prompts, tools, problems)
    _check_wrapper(head.rubric if head else None, prompts, tools, problems)
    if problems:
        raise ConfigError(path, problems)
    render = "template" if any(t.parameters is not None for t in tools) else "none"
    return Suite(name=head.name, format=head.format, system_prompt=head.system_prompt, toolset=tuple(tools),
                 prompts=tuple(prompts), generation=head.generation, rubric=head.rubric, path=str(path),
                 tool_format=head.tool_format, tool_render=render)


def _prompts(raw: dict, problems: list[str]) -> list[Prompt | None]:
    prompts = []
    for i, p in enumerate(raw.get("prompts") or []):
        label = f"prompts[{i}]" + (f" ({p.get('id')})" if isinstance(p, dict) and p.get("id") else "")
        if not isinstance(p, dict):
            problems.append(f"{label}: expected a mapping, got {p!r}")
            continue
        if not isinstance(p.get("expect"), dict):
            problems.append(f"{label}.expect: required mapping with at least 'tool'")
            continue
        prompts.append(cfgmod.collect(Prompt, {**p, "expect": p["expect"]}, f"{label}.", problems))
    return prompts


def _check_expectations(prompts: list[Prompt], tools: list, problems: list[str]) -> None:
    """Unique ids; every expected tool listed; every expected argument a parameter of its tool."""
    names = [t.name for t in tools]
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            problems.append(f"prompts: duplicate id {p.id!r}; ids must be unique")
        seen.add(p.id)
        for tool in p.expect.tools:
            if tool not in names:
                problems.append(f"prompts ({p.id}).expect: tool {tool!r} is not in the suite's tools list")
        params = next((t.arg_names for t in tools if t.name == p.expect.tool), ())
        for arg in p.expect.args:
            if params and arg not in params:
                problems.append(f"prompts ({p.id}).expect.args: {arg!r} is not a parameter of {p.expect.tool}")


def _check_wrapper(rubric, prompts: list[Prompt], tools: list, problems: list[str]) -> None:
    """The rubric's wrapper is shown to the model only as a schema, and is never itself expected."""
    listed = next((t for t in tools if rubric and t.name == rubric.wrapper), None)
    if listed is not None and listed.parameters is None:
        problems.append(f"rubric.wrapper: {rubric.wrapper!r} may be listed in tools only as a JSON schema "
                        "(name, description, parameters) to show it to the model through the chat template")
    for p in prompts:
        if rubric and rubric.wrapper in p.expect.tools:
            problems.append(f"prompts ({p.id}).expect: {rubric.wrapper!r} is the rubric's wrapper; expect the tool "
                            "called inside it")
