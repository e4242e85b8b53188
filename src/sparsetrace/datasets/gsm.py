"""GSM-style problems with step-by-step solutions from ``reasoning-gym`` (``gsm_symbolic``), for
chain-of-thought studies, rendered as a chat in the model's own template (:func:`gsm_text`).
"""

from __future__ import annotations

from ..errors import UsageError


def gsm_problems(n: int, seed: int = 0) -> list[dict]:
    """``n`` GSM-style problems: dicts with ``question``, ``reasoning`` (step by step) and ``answer``."""
    try:
        import reasoning_gym
    except ImportError as err:
        raise UsageError("reasoning-gym is not installed; run `pip install reasoning-gym`.") from err
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)
    return [
        {
            "question": item["question"],
            "reasoning": item["metadata"]["answer_cot"],
            "answer": str(item["answer"]),
        }
        for item in dataset
    ]


def _reasoning(steps: str, answer: str) -> str:
    """gsm_symbolic's ``answer_cot``: one step per line and a final ``#### answer``. Steps become
    paragraphs (Thought Anchors cuts at blank lines, and most steps end without a period)."""
    lines = [line.strip() for line in steps.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("####")]
    return "\n\n".join(lines + [f"The final answer is {answer}."])


def chat_text(tokenizer, problems: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """``problems`` (question, reasoning, answer) as one chat: a user turn and an assistant turn per
    problem. Returns the rendered text and the character spans of the message contents (the regions
    the sentences come from; template markup stays outside)."""
    messages = []
    for p in problems:
        messages += [{"role": "user", "content": p["question"].strip()},
                     {"role": "assistant", "content": _reasoning(p["reasoning"], p["answer"])}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    else:  # a base model without a template
        text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    regions, pos = [], 0
    for m in messages:
        at = text.find(m["content"], pos)
        assert at >= 0, "the chat template changed a message's content"
        regions.append((at, at + len(m["content"])))
        pos = at + len(m["content"])
    return text, regions


def gsm_text(tokenizer, n: int | None = None, *, min_tokens: int | None = None, seed: int = 0,
             max_problems: int = 400) -> tuple[str, list[tuple[int, int]], int]:
    """Chat text of ``n`` gsm problems, or of as many as reach ``min_tokens``; ``(text, regions,
    problems used)``."""
    pool = gsm_problems(n if n is not None else max_problems, seed=seed)
    if n is not None:
        return (*chat_text(tokenizer, pool), n)
    # grow by the per-problem token estimate, then check the exact count
    used = 1
    while True:
        text, regions = chat_text(tokenizer, pool[:used])
        count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if count >= min_tokens or used == len(pool):
            return text, regions, used
        used = min(len(pool), max(used + 1, int(used * min_tokens / count)))
