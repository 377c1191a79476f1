# tcmlab: two commands on a fresh machine — `make demo` and `make test`. Both create .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tcmlab-installed
RUNS   ?= runs
PRESET ?= digits

.PHONY: setup demo test test-gpu bench mutate clean

setup: $(STAMP)

# The venv gets its own pip.conf with an empty `constraint`, so a machine-wide pip constraint that caps torch below
# the pinned release (seen on some build machines) cannot make the install unsolvable. Nothing outside .venv changes.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	printf '[global]\nconstraint =\n' > $(VENV)/pip.conf
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(PY) -m tcmlab demo --preset $(PRESET) --out $(RUNS)/demo

# Unit tests, then every notebook at the `ci` preset through nbval (notebooks/conftest.py gives them a temp folder).
test: $(STAMP)
	$(PY) -m pytest -q tests
	cd notebooks && ../$(PY) -m pytest -q --nbval -p no:cacheprovider .

# GPU suite (tests/gpu): resume, live dFID, evaluate/sample, bf16/fp16, DDP with nccl. Skips with a reason without CUDA.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -rs -m gpu tests/gpu

bench: $(STAMP)
	$(PY) -m tcmlab.bench

# Mutation testing of losses/schedules/precond/samplers ([tool.mutmut] in pyproject.toml; docs/testing.md records the
# score). Not part of `make test`. Starts from a fresh mutants/ so the score never mixes in cached results of older
# code; MUTATE_CHILDREN caps the parallel workers (mutmut's default is one per core).
MUTATE_CHILDREN ?= 2
mutate: $(STAMP)
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children $(MUTATE_CHILDREN)
	$(VENV)/bin/mutmut results

clean:
	rm -rf $(RUNS)
