# Everything runs in .venv; `make test` and `make demo` set it up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch (a plain `torch` could pull a multi-GB CUDA build).
TORCH_PIN := torch==2.13.0
PADDLE_PIN := paddlepaddle==3.3.1
# mmseg's registry only (mmcv-lite has no compiled ops; full mmcv needs a build for your torch/CUDA).
MMSEG_PINS := mmcv-lite==2.1.0 mmengine==0.10.7 mmsegmentation==1.2.2 ftfy regex

.PHONY: venv test test-aot-oldest test-vision test-paddleseg demo example docs bench lint clean gpu-check gpu-ab

# setup.py compiles the CPU kernel (hieraloss/_native) into the source tree on install: re-install when it changes.
$(BIN)/.installed: pyproject.toml setup.py hieraloss/_native/tree_min.cpp hieraloss/_native/tree_min_kernel.h hieraloss/_native/logicseg_kernel.h
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN) $(PADDLE_PIN)
	$(BIN)/pip install -q $(MMSEG_PINS)
	$(BIN)/pip install -q -e '.[dev]'
	# yapf (via mmengine) pickles its grammar cache on first import; two pytest workers doing that
	# at once on a fresh venv can read a half-written file. Write it once here.
	$(BIN)/python -c "import yapf"
	touch $@

venv: $(BIN)/.installed

# Where a C++ compiler exists, a failed build of the compiled CPU kernel fails the tests instead of
# skipping them (HIERALOSS_REQUIRE_NATIVE=1); without one the vectorized ops are tested alone.
REQUIRE_NATIVE := $(shell command -v c++ >/dev/null 2>&1 && echo 1 || echo 0)

test: venv
	HIERALOSS_REQUIRE_NATIVE=$(REQUIRE_NATIVE) $(BIN)/python -m pytest -q -n 2 --durations=15

# The ahead-of-time kernel compiles again under the oldest triton the package admits for current torch
# releases (torch 2.11 ships triton 3.6.0): a kernel that only the newest triton compiles fails here.
OLDEST_TRITON := triton==3.6.0
VENV_OLD := .venv-triton-oldest
$(VENV_OLD)/bin/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV_OLD)
	$(VENV_OLD)/bin/pip install -q --upgrade pip
	$(VENV_OLD)/bin/pip install -q $(TORCH_PIN) $(OLDEST_TRITON) numpy 'hypothesis>=6.80' 'pytest>=7' 'pytest-xdist>=3'
	touch $@

test-aot-oldest: $(VENV_OLD)/bin/.installed
	$(VENV_OLD)/bin/python -m pytest -q -n 2 tests/kernels/test_kernels_aot.py

# segmentation_models_pytorch needs timm, which needs torchvision, and PyPI's torchvision needs the full torch
# build it was made for (not the CPU-only torch of .venv): a venv of its own for the smp / torchvision
# adapters and their guide pages. These pins lie on the CI machine's disk for Python 3.11.
VISION_PINS := torch==2.14.1 torchvision==0.29.1 timm==1.0.31 segmentation-models-pytorch==0.6.0
VENV_VISION := .venv-vision
$(VENV_VISION)/bin/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV_VISION)
	$(VENV_VISION)/bin/pip install -q --upgrade pip
	$(VENV_VISION)/bin/pip install -q $(VISION_PINS) numpy 'hypothesis>=6.80' 'pytest>=7' 'torchmetrics>=1.0'
	touch $@

test-vision: $(VENV_VISION)/bin/.installed
	$(VENV_VISION)/bin/python -m pytest -q -p no:cacheprovider tests/integrations/test_integrations_vision.py \
		tests/package/test_package_docs.py -k "vision or smp or pytorch"

# The real PaddleSeg 2.8.0 imports only beside numpy<2 (its opencv pin): its registry, its
# loss_computation and its guide page run in a venv of their own.
PADDLESEG_PINS := $(PADDLE_PIN) paddleseg==2.8.0 'numpy<2'
VENV_PADDLESEG := .venv-paddleseg
$(VENV_PADDLESEG)/bin/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV_PADDLESEG)
	$(VENV_PADDLESEG)/bin/pip install -q --upgrade pip
	$(VENV_PADDLESEG)/bin/pip install -q $(PADDLESEG_PINS) 'hypothesis>=6.80' 'pytest>=7'
	touch $@

test-paddleseg: $(VENV_PADDLESEG)/bin/.installed
	$(VENV_PADDLESEG)/bin/python -c "import paddleseg.models"  # the real package, not the stand-in
	$(VENV_PADDLESEG)/bin/python -m pytest -q -p no:cacheprovider tests/integrations/test_integrations_paddleseg.py \
		tests/package/test_package_docs.py -k "paddleseg"

# The end-to-end example: a Hugging Face SegFormer trained with HSSN on the demo scenes (CPU, about a minute).
example: venv
	$(BIN)/python examples/hf_segformer_hssn.py --out example_out

# On a machine with an NVIDIA GPU: the GPU tests and the training-step table, from the checkout
# (no venv, no network, nothing installed).
gpu-check:
	HIERALOSS_REQUIRE_TRITON=1 PYTHONPATH=. $(PY) benchmarks/gpu_check.py

# The open GPU comparisons (kernel variants against the default, in the same run), in at most 5 minutes:
# with `make gpu-check` first and last, a session fits the 15 minutes of device time it is lent.
gpu-ab:
	HIERALOSS_REQUIRE_TRITON=1 PYTHONPATH=. $(PY) benchmarks/gpu_ab.py

demo: venv
	$(BIN)/python -m hieraloss demo --out demo_out

docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench: venv
	$(BIN)/python -m hieraloss bench

lint: venv
	$(BIN)/ruff check hieraloss tests benchmarks

clean:
	rm -rf $(VENV) $(VENV_OLD) $(VENV_VISION) $(VENV_PADDLESEG) site demo_out example_out .pytest_cache build hieraloss/_native/*.so
