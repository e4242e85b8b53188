"""The walkthrough notebook (examples/walkthrough.ipynb) runs top to bottom in a fresh kernel, as a reader runs
it: a real ~2k-token trace of SmolLM2, the trace drawn inline, the sources of the last sentence, thought anchors
and a needle route. Its outputs are not committed; this test makes them (in a temporary folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "walkthrough.ipynb"


@pytest.mark.slow
def test_walkthrough_runs_top_to_bottom(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), \
        "commit the notebook without outputs (Kernel > Restart & Clear Output)"
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    html = [o["data"]["text/html"] for o in outputs if "data" in o and "text/html" in o["data"]]
    images = [o for o in outputs if "data" in o and "image/png" in o["data"]]
    print(text[-3000:])
    assert any("<iframe srcdoc=" in h and "sparsetrace-data" in h for h in html)  # the trace, drawn inline
    assert "traced in" in text and "the needle's block ranks" in text and "receiver heads:" in text
    assert "residual 0.9: the needle" in text
    assert len(images) == 2  # the layer x source chart and the route
    ranked = [line for line in text.splitlines() if line[:2].strip() in {"1", "2", "3"}]
    assert len(ranked) >= 3
    assert (tmp_path / "walkthrough-trace" / "manifest.json").is_file()
    (tmp_path / "executed.ipynb").write_text(json.dumps(nbformat.from_dict(nb)), encoding="utf-8")
