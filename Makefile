# mplus_lightning — `make help` lists the targets.
PY      := .venv/bin/python
STAMP   := .venv/.installed
# torch first, pinned: on this kind of machine 2.13.0 is a local CPU build; a bare `torch` would pull CUDA wheels.
TORCH   ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: help setup test demo demo-backbone bench gpu-check tiny stage1 stage2 stage3 clean

help:  ## show this help
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the package (idempotent)

test: setup  ## lint (ruff) and run the whole test suite (what CI runs)
	$(PY) -m ruff check .
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest $(PYTEST_ARGS)

demo: setup  ## the embedded default: tiny M+ on CPU — inject facts, read them back, print a table
	$(PY) -m mplus_lightning.demo

demo-backbone: setup  ## regenerate data/demo_backbone (the demo's pretrained tiny Llama, seed 0; ~5 min on one core)
	$(PY) -m mplus_lightning.demo --make-backbone

# OpenMP threads spin briefly, then sleep (BENCH_THREAD_ENV): sleeping at once (OMP_WAIT_POLICY=PASSIVE) costs
# every parallel op a wake-up (~70 us here), which M+'s many small ops pay more than a plain Llama; spinning for long
# (the default) lets one descheduled thread stall the others on a shared machine.
BENCH_THREAD_ENV ?= GOMP_SPINCOUNT=10000 KMP_BLOCKTIME=1
bench: setup  ## inference and training benchmarks at the `mid` shape (prints JSON)
	@mkdir -p bench_out
	$(BENCH_THREAD_ENV) $(PY) -m mplus_lightning.bench inference --shape mid --out bench_out/inference.json
	$(BENCH_THREAD_ENV) $(PY) -m mplus_lightning.bench training --shape mid --out bench_out/training.json

gpu-check: setup  ## CUDA only: 8B-size latency, MFU and peak memory per memory placement, one JSON line (<= 8 min)
	@mkdir -p bench_out
	$(PY) -m mplus_lightning.gpu_check --shape 8b --out bench_out/gpu_check.json

tiny: setup  ## train the tiny CPU model through stage 1 -> 2 -> 3 (a few minutes; starts again each time)
	$(PY) -m mplus_lightning.fit --config experiments/tiny.yaml overwrite=true
	$(PY) -m mplus_lightning.fit --config experiments/tiny_stage2.yaml overwrite=true
	$(PY) -m mplus_lightning.fit --config experiments/tiny_ltm.yaml overwrite=true

stage1: setup  ## stage 1 on Llama-3.1-8B (fill the paths in experiments/stage1.yaml or pass ARGS="key=value ...")
	$(PY) -m mplus_lightning.fit --config experiments/stage1.yaml $(ARGS)

stage2: setup  ## stage 2 (long documents + retriever), from stage 1's export
	$(PY) -m mplus_lightning.fit --config experiments/stage2.yaml $(ARGS)

stage3: setup  ## stage 3 (ltm: long-term memory), from stage 2's export
	$(PY) -m mplus_lightning.fit --config experiments/ltm.yaml $(ARGS)

clean:  ## remove generated outputs (keeps .venv)
	rm -rf checkpoints/runs bench_out data/generated
