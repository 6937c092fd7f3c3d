# One command each, on a fresh clone: the first use creates .venv and installs statelab into it.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench bench-llamacpp lint embedded clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m statelab.demo

embedded: $(STAMP)
	$(BIN)/python -m statelab.train.embedded

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_models.py
	$(BIN)/python benchmarks/bench_threads.py
	$(BIN)/python benchmarks/bench_store.py
	$(BIN)/python benchmarks/bench_gdssm.py
	$(BIN)/python benchmarks/bench_birdie.py
	$(BIN)/python benchmarks/bench_batch.py
	$(BIN)/python benchmarks/bench_serve.py
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/bench_cli.py

# optional, not in CI: builds llama-cpp-python from its sdist on first use (minutes), then statelab vs llama.cpp
bench-llamacpp: $(STAMP)
	$(BIN)/python benchmarks/bench_llamacpp.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
