# One entry point for people and CI: each target sets up .venv first if it is missing or stale.
VENV := .venv
PYTHON ?= python3.11
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)  # stage commands run `python` and `dvc` from .venv
export TF_CPP_MIN_LOG_LEVEL ?= 2  # TensorFlow's start-up banner hides the stage output

.PHONY: setup repro test test-slow lint
.DEFAULT_GOAL := repro

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

setup: $(VENV)/.installed

repro: setup  ## run the whole pipeline (MNIST_MIRROR=dir-or-url to download from a local copy)
	dvc repro

test: setup  ## the fast test suite (a few minutes)
	python -m pytest

test-slow: setup  ## full-size runs: the baseline reproduces ~98% test accuracy
	python -m pytest -m slow

lint: setup
	ruff check . && ruff format --check .
