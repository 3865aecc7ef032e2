"""The engine interface: how an eval gets replies from targets, whatever runs the model.

An engine is opened for one base model and the targets on it (the base itself, adapters on it).
``probe`` proves each target is the weights it claims to be (the recorded fingerprint, see
fingerprint.py) before anything is scored; ``generate`` answers (target, prompt) requests and
yields each reply as it lands, so the caller can keep it on disk at once. evaluate.py drives an
engine and does the scoring and the files; the engines know nothing of either.

Two engines implement it: ``batched`` (engine_batched.py: every target in one in-process batch)
and ``server`` (engine_server.py: an isolated ``mlx_lm.server``, one target after another).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

ENGINES = ("batched", "server")


@dataclass
class Reply:
    text: str | None
    finish_reason: str | None
    completion_tokens: int | None
    prompt_tokens: int | None
    latency_s: float
    error: str | None = None
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None


@dataclass(frozen=True)
class Request:
    target: object  # targets.Target
    prompt: object  # a suite prompt (its id, category, and what suite.messages renders)


class Engine(Protocol):
    name: str

    def probe(self, targets: list) -> dict[str, dict]:
        """Each target's probe answer by name; raises WrongModelError on a mismatch."""

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Reply]]:
        """Answer every request, yielding each as it finishes (in any order)."""

    def details(self) -> dict:
        """What to record about the engine in each result file."""

    def close(self) -> None:
        """Free the model or stop the server; safe to call twice."""
