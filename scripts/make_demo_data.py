#!/usr/bin/env python
"""Write the demo tool-call SFT set (mlx-lm chat JSONL) deterministically.

The system prompt and tool list come from the eval suite, so training and eval cannot drift apart
(an eval-only system prompt costs points the model never trained for). Paths and symbols are drawn
from pools disjoint from the suite's, and the script refuses to write a user request that also
appears in the suite.

    python scripts/make_demo_data.py [--suite evals/tools.yaml] [--out data/tools]

``--format xml`` writes the same requests in mlx-lm's ``tools`` format instead (a ``tools`` list
beside ``messages``, the answer as an assistant ``tool_calls`` turn), for a model whose chat template
renders them as Qwen3-Coder XML; ``--model-out`` also writes that model: the embedded SmolLM2 with
data/xml/chat_template.jinja as its chat template (weights linked, not copied).

    python scripts/make_demo_data.py --format xml --suite evals/tools-xml.yaml --out data/xml \
        --model-out build/smollm2-135m-xml
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_ft.suite import load_suite  # noqa: E402

PATHS = ["app/main.py", "src/server.py", "core/models.py", "api/views.py", "lib/cache.py", "utils/dates.py",
         "src/auth/tokens.py", "shop/cart.py", "web/forms.py", "jobs/worker.py", "config/settings.py"]
DOCS = ["README.md", "CHANGELOG.md", "docs/setup.md", "notes/plan.txt", "docs/api.md", "pyproject.toml"]
TESTS = ["tests/test_cart.py", "tests/test_auth.py", "tests/test_models.py", "tests/test_api.py",
         "tests/test_cache.py", "tests/test_worker.py"]
SYMBOLS = ["UserService", "CartItem", "parse_date", "TokenStore", "render_page", "OrderQueue", "load_config",
           "SessionManager", "retry_request", "EmailSender", "compute_total", "WorkerPool"]
QUERIES = ["User", "Cart", "Token", "Order", "Session", "Config", "Email"]
PATTERNS = ["assert $X", "open($F)", "time.sleep($T)", "except Exception:", "eval($E)", "len($X) == 0"]
ROUTES = ["/cart/<int:item>", "/login", "/api/<str:version>/users", "/orders/<uuid:oid>", "/static/<path:p>",
          "/blog/<slug:post>/edit"]
TEMPLATES = ["templates/cart.html", "templates/login.html", "templates/profile.html", "templates/email.html"]
COMMANDS = ["ls -la", "make build", "pip list", "du -sh .", "cat /etc/hostname", "npm test", "tox -e py311"]
MODULES = ["json", "pathlib", "typing", "datetime", "logging", "re", "functools"]
WORDS = ["hello", "TODO", "version 2", "done"]

# (tool, [request templates], argument builder)
TASKS = [
    ("read_file", ["Show me {p}.", "Open {p}.", "What does {p} contain?", "Print the contents of {p}.",
                   "Read {p} for me."], lambda r: {"path": r.choice(PATHS + DOCS)}),
    ("write_file", ["Write {c!r} into {p}.", "Create {p} with the text {c}.", "Save {c} to {p}."],
     lambda r: {"path": r.choice(DOCS[3:] + ["out/result.txt", "tmp/log.txt"]), "content": r.choice(WORDS)}),
    ("run_command", ["Run `{cmd}`.", "Execute {cmd} in the shell.", "Please run the command {cmd}."],
     lambda r: {"cmd": r.choice(COMMANDS)}),
    ("ruff_check", ["Run ruff on {p}.", "Lint {p}.", "Check {p} for lint errors."],
     lambda r: {"path": r.choice(PATHS)}),
    ("pytest_run", ["Run the tests in {p}.", "Execute {p} with pytest.", "Do the tests in {p} pass?"],
     lambda r: {"path": r.choice(TESTS)}),
    ("typecheck", ["Typecheck {p}.", "Run the type checker on {p}.", "Are there type errors in {p}?"],
     lambda r: {"path": r.choice(PATHS)}),
    ("git_status", ["Show git status.", "Which files changed in the repo?", "Is the working tree clean?"],
     lambda r: {}),
    ("git_diff", ["Show the diff of {p}.", "What changed in {p} since the last commit?", "git diff {p}"],
     lambda r: {"path": r.choice(PATHS)}),
    ("git_log", ["Show the last {n} commits.", "Print the git log, {n} entries.", "What were the latest {n} commits?"],
     lambda r: {"n": r.choice([3, 5, 10, 12, 20])}),
    ("cst_find_pattern", ["Find code matching {pat!r}.", "Search the codebase for the pattern {pat}.",
                          "Where does the pattern {pat} occur?"], lambda r: {"pattern": r.choice(PATTERNS)}),
    ("cst_rename", ["Rename {old} to {new}.", "Change the name {old} into {new} across the code."],
     lambda r: dict(zip(("old", "new"), r.sample(SYMBOLS, 2)))),
    ("cst_add_import", ["Import {m} in {p}.", "Add `import {m}` to {p}."],
     lambda r: {"path": r.choice(PATHS), "module": r.choice(MODULES)}),
    ("goto_definition", ["Go to the definition of {s}.", "Where is {s} defined?", "Find the definition of {s}."],
     lambda r: {"symbol": r.choice(SYMBOLS)}),
    ("find_references", ["Find all references to {s}.", "Who calls {s}?", "List the usages of {s}."],
     lambda r: {"symbol": r.choice(SYMBOLS)}),
    ("workspace_symbols", ["Search workspace symbols for {q}.", "Which symbols match {q}?"],
     lambda r: {"query": r.choice(QUERIES)}),
    ("validate_route_pattern", ["Validate the route {rt}.", "Is {rt} a valid route pattern?",
                                "Check the route pattern {rt}."], lambda r: {"pattern": r.choice(ROUTES)}),
    ("list_routes", ["List all routes.", "What routes are registered?", "Show the URL routes of the app."],
     lambda r: {}),
    ("check_escaping", ["Check escaping in {t}.", "Does {t} escape its output?", "Audit {t} for unescaped output."],
     lambda r: {"path": r.choice(TEMPLATES)}),
]


def render(template: str, args: dict) -> str:
    fill = {"p": args.get("path", ""), "c": args.get("content", ""), "cmd": args.get("cmd", ""),
            "n": args.get("n", ""), "pat": args.get("pattern", ""), "old": args.get("old", ""),
            "new": args.get("new", ""), "m": args.get("module", ""), "s": args.get("symbol", ""),
            "q": args.get("query", ""), "rt": args.get("pattern", ""), "t": args.get("path", "")}
    return template.format(**fill)


def code_of(tool: str, args: dict) -> str:
    return f"{tool}({', '.join(f'{k}={v!r}' for k, v in args.items())})"


def answer(tool: str, args: dict) -> str:
    return "<tool_call>" + json.dumps({"name": "execute_code", "arguments": {"code": code_of(tool, args)}}) + "</tool_call>"


def as_tool_calls(row: dict, tools: list[dict]) -> dict:
    """The row in mlx-lm's tools format: the call as an assistant ``tool_calls`` turn, the schemas beside."""
    call = json.loads(row["messages"][-1]["content"].removeprefix("<tool_call>").removesuffix("</tool_call>"))
    turn = {"role": "assistant", "tool_calls": [{"type": "function", "function": call}]}
    return {"messages": [*row["messages"][:-1], turn], "tools": tools}


def write_model(out: Path, template: Path) -> None:
    """The embedded SmolLM2 with another chat template: its files linked, tokenizer_config rewritten."""
    from mlx_ft.models import resolve_model

    src = resolve_model(None)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "tokenizer_config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template.read_text()
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    print(f"wrote {out}: {src.name} with the chat template {template}")


PREFIXES = ["", "", "Please: ", "Can you help? ", "Quick one. ", "Next step: ", "Hey, "]


def examples(system: str, n: int, rng: random.Random, banned: set[str]) -> list[dict]:
    """Round-robin over the tools; a request is never repeated while fresh ones can be found."""
    rows, seen = [], set()
    while len(rows) < n:
        tool, templates, build = TASKS[len(rows) % len(TASKS)]
        for _attempt in range(50):
            args = build(rng)
            user = rng.choice(PREFIXES) + render(rng.choice(templates), args)
            if user not in seen and user not in banned:
                break
        if user in banned:
            continue
        seen.add(user)
        rows.append({"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                                  {"role": "assistant", "content": answer(tool, args)}]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="evals/tools.yaml")
    ap.add_argument("--out", default="data/tools")
    ap.add_argument("--train", type=int, default=216)
    ap.add_argument("--valid", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", choices=["json", "xml"], default="json",
                    help="json: the call as <tool_call>{json}</tool_call> text; xml: mlx-lm's tools format")
    ap.add_argument("--model-out", help="with --format xml: also write the XML-template model folder here")
    a = ap.parse_args()
    suite = load_suite(a.suite)
    assert {t for t, _, _ in TASKS} <= suite.tool_names, "every demo tool must be in the suite"
    rng = random.Random(a.seed)
    banned = {p.user for p in suite.prompts}
    rows = examples(suite.system_prompt, a.train + a.valid, rng, banned)
    rng.shuffle(rows)
    if a.format == "xml":
        tools = suite.tools(suite.prompts[0])
        assert tools, f"{a.suite} shows no tools to the model; --format xml needs JSON-schema tools"
        rows = [as_tool_calls(r, tools) for r in rows]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[: a.train]), ("valid", rows[a.train:])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        print(f"wrote {out / f'{name}.jsonl'}: {len(part)} examples")
    if a.model_out:
        write_model(Path(a.model_out), Path(__file__).resolve().parent.parent / "data" / "xml" / "chat_template.jinja")


if __name__ == "__main__":
    main()
