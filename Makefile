# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.requirements-installed
NOTEBOOK := dino_vit.ipynb
EXECUTE := $(BIN)/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=-1 \
	--ExecutePreprocessor.record_timing=False
TIDY := $(BIN)/python tests/tidy_notebook.py
PYTEST := $(BIN)/python -m pytest -p no:cacheprovider -o tmp_path_retention_policy=failed

.PHONY: setup demo test notebook bench torchrun clean

NPROC ?= 1
# DINO_PROFILE is read as the notebook and torchrun_train.py read it; PROFILE wins over it
PROFILE ?= $(or $(DINO_PROFILE),imagenet64)
SET ?=

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

setup: $(STAMP)

## demo: execute the notebook headless on its default profile (figures go to figures/)
demo: setup
	$(EXECUTE) --output-dir build --output $(NOTEBOOK) $(NOTEBOOK)
	$(TIDY) build/$(NOTEBOOK)
	@echo "executed copy: build/$(NOTEBOOK); figures: figures/"

## test: nbval re-executes the notebook (checked cells compared) and the unit tests run
test: setup
	$(PYTEST) --nbval-lax --nbval-sanitize-with tests/sanitize.cfg $(NOTEBOOK) tests/

## notebook: re-execute the notebook in place, as it is committed (progress bars end as one line each)
notebook: setup
	$(EXECUTE) --inplace $(NOTEBOOK)
	$(TIDY) $(NOTEBOOK)

## bench: every benchmark in tests/benchmarks/, with its figures
bench: setup
	$(BIN)/python tests/benchmarks/run_all.py

## torchrun: train with the notebook's code on NPROC processes (GPUs: NCCL; CPUs: gloo)
##   make torchrun NPROC=8 PROFILE=imagenet64 SET="data_root=/data/imagenet64 batch_size=128"
torchrun: setup
	$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) tests/torchrun_train.py --profile $(PROFILE) --set $(SET)

clean:
	rm -rf build data/cache data/embedded
