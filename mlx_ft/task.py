"""A task is (prompts, how to render one, how to score one), as inspect_ai has dataset -> solver ->
scorer. The tools suite (``mlx_ft.suite``) and BFCL (``mlx_ft.bfcl``) are two tasks; the eval engines
use only what is here, so they never switch on the kind of suite.

Tools reach the model one of three ways, recorded as ``tool_render`` in every result: ``template``
(OpenAI function schemas passed as ``tools=`` to the chat template, as mlx-lm renders training data
with a ``tools`` list), ``system_prompt`` (the schemas written into the system turn, for templates
that ignore ``tools``), or ``none`` (the suite's own system prompt describes them).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from typing import Any

from mlx_ft.parsers import names as format_names

RENDERS = ("template", "system_prompt", "none")
SCHEMA_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": "string"}
PROBE = {"type": "function", "function": {"name": "mlxft_probe_tool", "description": "probe",
                                          "parameters": {"type": "object", "properties": {}}}}


def openai_tools(functions: list[dict] | tuple) -> list[dict]:
    """Function schemas in OpenAI's tool format, with BFCL's Python type names made JSON Schema's."""
    return [{"type": "function", "function": _schema_types(copy.deepcopy(dict(f)))} for f in functions]


def _schema_types(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _schema_types(v) for k, v in node.items()}
        if isinstance(out.get("type"), str):
            out["type"] = SCHEMA_TYPES.get(out["type"], out["type"])
        return out
    if isinstance(node, list):
        return [_schema_types(v) for v in node]
    return node


def renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template shows a ``tools=`` list to the model (SmolLM2's does not)."""
    if tokenizer is None:
        return False
    msgs = [{"role": "user", "content": "hi"}]
    try:
        text = tokenizer.apply_chat_template(msgs, tools=[PROBE], tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot take tools does not render them
        return False
    return isinstance(text, str) and "mlxft_probe_tool" in text


def tools_in_system(system: str, schemas: list[dict]) -> str:
    """The system turn with the function schemas written into it (templates without ``tools``)."""
    functions = "\n".join(json.dumps(s["function"], ensure_ascii=False) for s in schemas)
    block = f"You can call these functions (JSON schemas):\n{functions}"
    return f"{system}\n\n{block}" if system else block


def digest(blob: dict) -> str:
    text = json.dumps(blob, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Task:
    """What the eval engines and the scorer use; subclasses are frozen dataclasses with ``name``,
    ``path``, ``prompts``, ``generation``, ``tool_format`` and ``tool_render`` fields."""

    def messages(self, prompt: Any) -> list[dict]:
        raise NotImplementedError

    def tools(self, prompt: Any) -> list[dict] | None:
        """OpenAI function schemas for ``tools=`` (template and server request), None when not rendered so."""
        raise NotImplementedError

    def score(self, prompt: Any, text: str | None, finish_reason: str | None, error: str | None, parser: Any):
        raise NotImplementedError

    def digest(self) -> str:
        raise NotImplementedError

    def bind(self, tokenizer: Any) -> Task:
        """This task as it must be rendered for ``tokenizer``: tools through the chat template when
        the template renders them, else in the system prompt. Call it before ``digest``."""
        if self.tool_render == "none":
            return self
        mode = "template" if renders_tools(tokenizer) else "system_prompt"
        return self if mode == self.tool_render else dataclasses.replace(self, tool_render=mode)

    def record(self) -> dict:
        """What a result file must say about how the prompts were rendered."""
        return {"tool_render": self.tool_render, "tool_format": self.tool_format}


def check_format(value: str) -> list[str]:
    known = format_names()
    return [] if value in known else [f"tool_format: {value!r} is not a known format; use one of {', '.join(known)}"]
