# Shortcuts for the README's two set-up commands. PYTHON is whichever interpreter you run the project with.
PYTHON ?= python3

.PHONY: install run test lint

# Keeps an installed torch (e.g. a CUDA build); otherwise installs torch 2.13.0 first (a CPU build where
# that is what the package index offers), then the project with its test tools.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e '.[test]'

# The main job: on a GPU the SDXL benchmark (random weights, no download); on a CPU-only machine the demo.
run: install
	$(PYTHON) -m runner +experiment=$$($(PYTHON) -c "import torch; print('sdxl_random' if torch.cuda.is_available() else 'demo')")

test:
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .
