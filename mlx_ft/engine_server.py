"""The ``server`` engine: one isolated ``mlx_lm.server`` per base model (server.py proves it is
ours and serving the model we meant), every target of that base as a per-request adapter, one
target after another, its prompts in flight at once so the server batches them."""

from __future__ import annotations

import concurrent.futures as cf
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

from mlx_ft.engines import Reply, Request
from mlx_ft.errors import ServerError
from mlx_ft.server import Server


class ServerEngine:
    name = "server"

    def __init__(self, model: Path, suite, *, port: int | None = None, concurrency: int = 256,
                 log_path: Path | None = None, server_factory=Server, log: Callable[[str], None] = lambda s: None):
        self.suite, self.concurrency = suite, concurrency
        self.server = server_factory(model, port=port, log_path=log_path, max_tokens=suite.generation.max_tokens,
                                     concurrency=concurrency, log=log)
        self.server.__enter__()

    def __enter__(self) -> "ServerEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.server.close()

    def details(self) -> dict:
        return {"name": self.name}

    def probe(self, targets: list) -> dict[str, dict]:
        return {t.name: self.server.verify(t.fingerprint, adapter=_adapter(t)) for t in targets}

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Reply]]:
        """Target by target (the server drains its batch whenever the adapter changes)."""
        for _, group in itertools.groupby(requests, key=lambda r: r.target.name):
            yield from self._target(list(group))

    def _target(self, requests: list[Request]) -> Iterator[tuple[Request, Reply]]:
        gen, target = self.suite.generation, requests[0].target
        if len(requests) > 1:
            # One 1-token request first: the server caches the KV of the shared system prompt, and the
            # concurrent batch below starts from that cache instead of prefilling it once per prompt.
            self._ask(requests[0], max_tokens=1)
        with cf.ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(requests)))) as pool:
            futures = {pool.submit(self._ask, r, gen.max_tokens): r for r in requests}
            try:
                for fut in cf.as_completed(futures):
                    reply = fut.result()
                    if reply.error and not self.server.alive():
                        raise ServerError(f"the server died during the eval of {target.name}\nLog:\n"
                                          f"{self.server.log_tail()}")
                    yield futures[fut], reply
            except BaseException:
                for f in futures:
                    f.cancel()
                self.server.close()  # in-flight requests fail at once instead of holding the pool open
                raise

    def _ask(self, request: Request, max_tokens: int) -> Reply:
        gen = self.suite.generation
        tools = self.suite.tools(request.prompt)
        return self.server.chat(self.suite.messages(request.prompt), adapter=_adapter(request.target),
                                max_tokens=max_tokens, temperature=gen.temperature, top_p=gen.top_p,
                                stop=gen.stop_sequences if max_tokens > 1 else (), tools=tools)


def _adapter(target) -> str | None:
    return str(target.adapter) if target.adapter else None
