# Two user-facing targets: `make demo` (the whole chain on the synthetic world) and
# `make test`. Both bootstrap .venv (Python 3.11) and NLTK's WordNet on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export NLTK_DATA ?= $(CURDIR)/.cache/nltk_data
# DeepSpeed's CPU build of its small extensions (about 80 s) is kept between runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0
PYTEST_ARGS ?=

.PHONY: setup browser demo test lint clean

setup: $(STAMP) $(NLTK_DATA)/corpora/wordnet/lexnames

$(STAMP): pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "error: python3.11 not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $@

$(NLTK_DATA)/corpora/wordnet/lexnames: | $(STAMP)
	$(BIN)/python -m jobs.setup_nltk --dir $(NLTK_DATA)

demo: setup
	$(BIN)/python -m jobs.demo $(DEMO_ARGS)

# Debian's chromium and chromium-driver for the page test (apt-get when missing and root)
browser: | $(STAMP)
	$(BIN)/python -m jobs.setup_browser

test: setup browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .cache
