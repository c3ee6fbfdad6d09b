# make demo: set up .venv on first use, then synthetic data -> preprocessing summary.
# make test: the test suite (what CI runs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Tests and CI read the A424 atlas from the shared data folder when it is there;
# elsewhere it is downloaded (sha256-pinned) into ~/.cache/brainlm on first use.
SHARED_ATLAS := $(abspath ../shared/data/atlases)
ifneq ($(wildcard $(SHARED_ATLAS)/A424+2mm.nii.gz),)
export BRAINLM_ATLAS_DIR ?= $(SHARED_ATLAS)
endif
DEMO_DIR ?= demo

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/brainlm synth --out $(DEMO_DIR)/raw --subjects 20 --timepoints 400 --seed 0
	$(BIN)/brainlm preprocess --input $(DEMO_DIR)/raw --out $(DEMO_DIR)/processed \
		--workers 2 --allow-fallback-atlas

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/synthetic.py
	$(BIN)/python benchmarks/parcellate.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
