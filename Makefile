# `make demo`: install, then train on the embedded digits, sample, evaluate. `make test`: install, lint, run the tests.
# `make test-fast`: the unit tests only; `make lint` / `make format`: ruff.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
RUN ?= runs/digits

.PHONY: install demo test test-fast lint format system-deps clean

# Idempotent: re-runs only when pyproject.toml changes. torch first, from the pinned versions,
# so nothing later can pull another build; deepspeed compiles against it (no build isolation).
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps img2dataset==1.47.0  # its deps are in the test extra; its own pins would downgrade webdataset
	$(PIP) install --no-build-isolation deepspeed
	NO_ALBUMENTATIONS_UPDATE=1 $(BIN)/python -c "import torch, deepspeed, ddpm_dist, img2dataset; assert torch.__version__.startswith('2.14.1'), torch.__version__"
	touch $@

install: $(VENV)/.installed

# The demo: train (tracking the post-hoc EMA profiles), pick the EMA length with the sweep (the project's Fréchet
# distance at 5 lengths, best among those the tracked profiles reconstruct within --max-fit-error), sample a grid from the chosen EMA, evaluate it, write the run report.
GUIDANCE ?= 1.0
PROFILES := "ema.stds=[0.05,0.15,0.25]" ema.snapshot_every_images=15000
CLASSES := 0,1,2,3,4,5,6,7,8,9
demo: install
	$(BIN)/python -m ddpm_dist.train --config configs/digits.yaml run_dir=$(RUN) metrics.tensorboard=true $(PROFILES)
	$(BIN)/python -m ddpm_dist.ema sweep --run $(RUN) --std-range 0.05:0.25:5 --num-images 500 --classes $(CLASSES) --guidance $(GUIDANCE)
	$(BIN)/python -m ddpm_dist.sample --export $(RUN)/ema_sweep/best.safetensors --num-images 100 --classes $(CLASSES) --guidance $(GUIDANCE) --grid-rows 10 --out $(RUN)/samples/final
	$(BIN)/python -m ddpm_dist.report --run $(RUN)
	@echo "pictures: $(RUN)/samples/final/grid.png $(RUN)/samples/final/trajectory.png $(RUN)/samples/final/reverse.gif $(RUN)/curves.png $(RUN)/ema_sweep/sweep.png"
	@echo "report: $(RUN)/report.html   TensorBoard: $(BIN)/tensorboard --logdir $(RUN)/tensorboard"

# SLURM, munge, Prometheus, iproute2 (test hosts in network namespaces), chromium (the run report, headless) and
# etcd (torchrun's etcd-v2 rendezvous, tests/system/test_elastic.py) for the system tests (Debian packages; root).
system-deps:
	@if command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v prometheus >/dev/null \
	  && command -v ip >/dev/null && command -v nsenter >/dev/null && command -v chromium >/dev/null \
	  && command -v etcd >/dev/null; then \
	  echo "system packages present"; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  slurmctld slurmd slurm-client munge prometheus iproute2 util-linux chromium etcd-server >/dev/null; fi

# ruff, configured in pyproject.toml: the formatter's layout and the linter's rules, checked before the tests.
lint: install
	$(BIN)/ruff format --check ddpm_dist launchers tests bench
	$(BIN)/ruff check ddpm_dist launchers tests bench

format: install
	$(BIN)/ruff format ddpm_dist launchers tests bench
	$(BIN)/ruff check --fix ddpm_dist launchers tests bench

test: install system-deps lint
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=40 -n 2 --dist loadgroup tests

# The contributor's inner loop: tests/unit only (one process, no servers, no namespaces, no SLURM); CI runs `test`.
test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=10 -m unit tests

clean:
	rm -rf $(VENV) runs
