# make demo: set up .venv on first use, write the synthetic cohort into data/, then
#            `dvc repro` the whole pipeline (demo profile of params.yaml) and say where to look.
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

.PHONY: demo test install bench clean infra-up infra-down infra-secrets infra-config

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

export DVC_NO_ANALYTICS = 1
export MLFLOW_DISABLE_TELEMETRY = true

demo: $(STAMP)
	$(BIN)/brainlm stage synth
	test -d .dvc || $(BIN)/dvc init -q $$(git rev-parse --git-dir >/dev/null 2>&1 || echo --no-scm)
	$(BIN)/dvc add -q data
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	@echo
	@echo "Results:    runs/evaluation/results.md"
	@cat runs/evaluation/results.md
	@echo "Metrics:    .venv/bin/dvc metrics show   (plots: .venv/bin/dvc plots show)"
	@echo "Validation: validation/validation.html   (GX Data Docs: validation/gx/uncommitted/data_docs/local_site/index.html)"
	@echo "Registry:   $$(cat metrics/register.json | tr -d '\n ')"
	@echo "MLflow UI:  ./mlflow/server.sh   then http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"

# one pytest worker per CI core; each test file stays on one worker (its module fixtures once);
# the longest files are collected first (tests/conftest.py)
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/synthetic.py
	$(BIN)/python benchmarks/parcellate.py

# Team services (infra/compose.yaml): PostgreSQL, MinIO, MLflow, Prefect server and worker.
# Secrets come from infra/.env (never committed): `make infra-secrets` writes one.
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
INFRA := $(COMPOSE) --project-directory infra -f infra/compose.yaml \
         $(if $(GPU),-f infra/compose.gpu.yaml,) --env-file infra/.env

infra/.env:
	@echo "infra/.env is missing: run 'make infra-secrets' (random secrets) or copy" \
	      "infra/.env.example to infra/.env and fill in every empty value" >&2; exit 1

infra-secrets:
	infra/make-env.sh

infra-config: infra/.env
	$(INFRA) config -q

infra-up: infra/.env
	$(INFRA) up -d --build $(if $(findstring docker compose,$(COMPOSE)),--wait,)
	@echo "MLflow   http://127.0.0.1:5000   Prefect  http://127.0.0.1:4200   MinIO  http://127.0.0.1:9001"
	@echo "Clients: set -a; . infra/client.env; set +a   (written by make infra-secrets)"

# keeps the volumes (databases, artefacts); `$(COMPOSE) ... down -v` would delete them
infra-down: infra/.env
	$(INFRA) down

clean:
	rm -rf $(DEMO_DIR) .pytest_cache data processed validation models runs
