# Two entry points for a fresh machine; each creates its own virtual environment.
#   make demo   - the main job: a real Ghost compression run on the offline digits data (CPU, a few minutes)
#   make test   - lint and the whole test suite (what CI runs)
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python examples/cifar_ghost.py --dataset digits --arch resnet20 --epochs 8 --start-epoch 3 --stages 2 --output runs/demo

test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q -m "not slow"
	$(BIN)/pytest -q -m slow  # the breadth suite's big models, in their own step

bench: venv
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.all

.PHONY: venv demo test bench
