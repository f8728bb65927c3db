# Shortcuts for the README's two set-up commands. PYTHON is whichever interpreter you run the project with.
PYTHON ?= python3

.PHONY: install run test lint wheelhouse

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

# Everything the project needs, as wheels for a machine without internet (README, "A GPU machine without
# internet"): this environment's resolved packages, downloaded for the target's Python and platform, plus
# the project's own wheel. torch and its CUDA packages are left out: the target keeps its own build.
TARGET_PYTHON ?= 3.12
TARGET_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
wheelhouse:
	rm -rf wheelhouse && mkdir -p wheelhouse
	$(PYTHON) -m pip wheel -q --no-deps -w wheelhouse . "antlr4-python3-runtime==4.9.3"
	$(PYTHON) -m pip freeze --exclude-editable | grep -v -i -E '^(torch|triton|antlr4-python3-runtime)==|^nvidia-' > wheelhouse/requirements.txt
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version $(TARGET_PYTHON) \
		$(foreach platform,$(TARGET_PLATFORMS),--platform $(platform)) --platform any -d wheelhouse -r wheelhouse/requirements.txt
	@echo "wheelhouse/ is ready: copy it over, then there: pip install --no-index --find-links wheelhouse diffusion-bench-runner"
