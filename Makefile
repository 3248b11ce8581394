# One entry point for people and CI: each target sets up .venv first if it is missing or stale.
VENV := .venv
PYTHON ?= python3.11
# Stage commands run `python` and `dvc` from .venv; TensorFlow's start-up banner would hide
# the stage output. (No comments after these values: make would keep the spaces before them.)
export PATH := $(abspath $(VENV))/bin:$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup repro test test-slow lint
.DEFAULT_GOAL := repro

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -qq --disable-pip-version-check -r requirements.txt
	touch $@

setup: $(VENV)/.installed

repro: setup  ## run the whole pipeline (MNIST_MIRROR=dir-or-url to download from a local copy)
	dvc repro

# Two workers, one file each at a time (a module's fixtures stay in one process), in the order
# tests/conftest.py gives (the longest files first): most of the suite's time is single-threaded
# start-up of TensorFlow and DVC processes, not training.
test: setup  ## the fast test suite (a few minutes)
	python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

test-slow: setup  ## full-size runs: the baseline reproduces ~98% test accuracy
	python -m pytest -m slow

# Ray and the S3/SSH remotes for `make ablations` on a cluster, kept out of `make repro`'s .venv
# until asked for (install on every node).
.PHONY: setup-cluster test-cluster
$(VENV)/.cluster-installed: $(VENV)/.installed requirements-cluster.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-cluster.txt -c requirements.txt
	touch $@

setup-cluster: $(VENV)/.cluster-installed

# In a network namespace of its own where `unshare` allows: Ray's servers bind every interface,
# and there the only one is loopback.
test-cluster: setup-cluster  ## the study through a two-node local Ray cluster (a few minutes)
	if unshare -rn ip link set lo up 2>/dev/null; then \
		unshare -rn sh -c 'ip link set lo up && exec python -m pytest -m cluster'; \
	else python -m pytest -m cluster; fi

lint: setup
	ruff check . && ruff format --check .

# Do the committed results reproduce? Rerun every stage, then compare test_accuracy with git HEAD's.
# TOLERANCE=x overrides the allowed move (see tools/check_repro.py for why there is one). The script
# runs `dvc repro --force` itself, after checking TOLERANCE and the committed value.
.PHONY: check-repro plots-template
check-repro: setup  ## rerun the whole pipeline; fail if test_accuracy moved from the committed value
	python -m tools.check_repro --rerun $(if $(TOLERANCE),--tolerance '$(TOLERANCE)')

plots-template: setup  ## rebuild .dvc/offline-plots/ (vega for `dvc plots` offline) from npm
	python .dvc/offline-plots/build.py

# The study (ablations.yaml): every variant at every seed as a named DVC experiment, then its
# report. SEEDS="0 1" and ONLY=baseline,sgd narrow it; SET="k=v ..." adds overrides to every run;
# JOBS=N runs N at once (default 2), each with cores/N training threads; FORCE=1 re-runs existing ones.
# With RAY_ADDRESS set, one Ray task per run on that cluster instead (`make setup-cluster` first;
# CPUS=N per run). Exit status 3 means some runs failed: the report still covers the others; an
# `error:` line (status 1) or Ctrl-C ends it without one. `make report SINCE=REV` adds a section
# setting the study beside the one committed at REV: each variant's verdict then and now (CHANGE="..."
# says in it what changed in between).
STUDY_ARGS = $(if $(SEEDS),--seeds "$(SEEDS)") $(if $(ONLY),--only $(ONLY))
.PHONY: ablations report
ablations: setup  ## run the study's experiments and write reports/ablations.md
	$(if $(RAY_ADDRESS),python -m sweep.cluster $(if $(CPUS),--cpus $(CPUS)), \
		python -m sweep.local $(if $(JOBS),--jobs $(JOBS))) \
		$(STUDY_ARGS) $(if $(FORCE),--force) $(if $(TIMEOUT),--timeout $(TIMEOUT)) $(SET) \
		|| { test $$? = 3 && python -m sweep.report $(STUDY_ARGS); exit 1; }
	python -m sweep.report $(STUDY_ARGS)

report: setup  ## reports/ablations.{md,csv} and figures from the experiments DVC has (SEEDS, ONLY as above)
	python -m sweep.report $(STUDY_ARGS) $(if $(SINCE),--since $(SINCE)) $(if $(CHANGE),--change "$(CHANGE)")

# The hyperparameter search (tune.yaml's space): TRIALS=N trials in all (default 20), each the DVC
# experiment tune-<number>, run as the study's runs are (JOBS, SET, TIMEOUT, RAY_ADDRESS and CPUS as
# above); then reports/tuning.md. Its journal, reports/tuning.journal, lets Ctrl-C and `make tune`
# again finish the planned trials; the best one is confirmed by the study (docs/tuning.md).
.PHONY: tune
tune: setup  ## search the MLP's hyperparameters with Optuna (TRIALS=N) and write reports/tuning.md
	python -m sweep.tune $(if $(TRIALS),--trials $(TRIALS)) $(if $(JOBS),--jobs $(JOBS)) \
		$(if $(RAY_ADDRESS),--ray $(if $(CPUS),--cpus $(CPUS))) $(if $(TIMEOUT),--timeout $(TIMEOUT)) $(SET) \
		|| { test $$? = 3 && python -m sweep.tune_report; exit 1; }
	python -m sweep.tune_report

# The train stage against the plain Keras script on TensorFlow and on JAX, interleaved, with the
# machine's matmul rate: benchmarks/results.{json,md} (about 15 minutes on 2 cores). QUICK=1 shrinks
# data and epochs (minutes, to check the code; not figures to quote); PROFILE=1 adds where an MLP
# epoch's time goes. JAX is the benchmark's own dependency, kept out of `make repro`'s .venv until here.
.PHONY: bench setup-bench
$(VENV)/.bench-installed: $(VENV)/.installed requirements-bench.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-bench.txt -c requirements.txt
	touch $@

setup-bench: $(VENV)/.bench-installed

bench: setup-bench  ## time the train stage against plain Keras scripts (QUICK=1, PROFILE=1)
	python -m benchmarks.bench $(if $(QUICK),--quick) $(if $(PROFILE),--profile)

# Not a DVC stage: a command for people. IMAGES is split on spaces (call `python -m tools.predict`
# directly for names with spaces); JSON=1 prints one JSON object per image.
.PHONY: predict
predict: setup  ## classify your own PNG/JPEG images with data/model.keras: make predict IMAGES="a.png b.jpg"
	$(if $(IMAGES),,$(error IMAGES is empty: make predict IMAGES="a.png b.jpg"))
	python -m tools.predict $(if $(JSON),--json) $(IMAGES)
