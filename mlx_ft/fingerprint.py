"""A model's fingerprint: its greedy answer to a fixed probe, token ids and log-probabilities.

Recorded once when a checkpoint is written (the weights are in memory then) and checked against
the server before any prompt is scored. Token ids alone are not enough: two checkpoints (or a
checkpoint and the base, when the server silently ignores the adapter) can give the same greedy
text; their log-probabilities still differ.
"""

from __future__ import annotations

PROBE_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROBE_TOKENS = 8
LOGPROB_TOLERANCE = 0.02  # batched vs single-sequence float noise is ~1e-4; distinct weights differ far more


def fingerprint_model(model, tokenizer, max_tokens: int = PROBE_TOKENS) -> dict:
    """Greedy probe answer computed in-process, in the shape the server check compares."""
    from mlx_lm.generate import stream_generate

    prompt = tokenizer.apply_chat_template(PROBE_MESSAGES, add_generation_prompt=True)
    ids, logprobs = [], []
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        if r.token in tokenizer.eos_token_ids:
            break
        ids.append(int(r.token))
        logprobs.append(round(float(r.logprobs[r.token].item()), 5))
    return {"token_ids": ids, "logprobs": logprobs, "text": tokenizer.decode(ids), "max_tokens": max_tokens}


def compare(expected: dict, token_ids: list[int], logprobs: list[float], tol: float = LOGPROB_TOLERANCE) -> str | None:
    """None when the answer matches the fingerprint, else a one-line reason."""
    want = expected["token_ids"]
    if list(token_ids) != list(want):
        return f"probe tokens differ: expected {want}, server answered {list(token_ids)}"
    worst = max((abs(a - b) for a, b in zip(expected["logprobs"], logprobs)), default=0.0)
    if worst > tol:
        return f"probe log-probabilities differ by up to {worst:.4f} (tolerance {tol}): same text, other weights"
    return None
