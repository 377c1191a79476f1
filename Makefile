# tcmlab: two commands on a fresh machine — `make demo` and `make test`. Both create .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tcmlab-installed
RUNS   ?= runs
PRESET ?= digits

.PHONY: setup chromium demo screenshot test test-gpu bench sweep results mutate clean

setup: $(STAMP)

# The venv gets its own pip.conf with an empty `constraint`, so a machine-wide pip constraint that caps torch below
# the pinned release (seen on some build machines) cannot make the install unsolvable. Nothing outside .venv changes.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	printf '[global]\nconstraint =\n' > $(VENV)/pip.conf
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Debian's Chromium, for kaleido's PNG copies of figures and the real-browser test (tests/test_browser.py). Installed
# with apt-get where we are root and it is missing (never `playwright install`); elsewhere a note says what is lost.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt-get install -y chromium)"; \
	    apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
	      || echo "NOTE: apt-get could not install chromium: no PNG copies of figures; the browser test will skip"; \
	  else echo "NOTE: no chromium (Debian: apt-get install -y chromium): no PNG copies of figures; the browser test will skip"; fi; }

# The demo is the notebooks: papermill runs 01 -> 02 -> 03 at $(PRESET) into $(DEMO) (run directories and executed
# notebooks side by side), and nbconvert writes an HTML copy of each that opens in any browser. Another preset than
# digits gets its own folder (runs/demo/toy2d): a run directory holds one preset's run.
DEMO ?= $(RUNS)/demo$(if $(filter-out digits,$(PRESET)),/$(PRESET))
NOTEBOOKS := 01_consistency_training 02_truncated_training 03_tradeoff_explorer
demo: $(STAMP) chromium
	mkdir -p $(DEMO)
	cd notebooks && for nb in $(NOTEBOOKS); do \
	  env -u TCMLAB_NB_OUT ../$(PY) -m papermill $$nb.ipynb $(abspath $(DEMO))/$$nb.ipynb -p preset $(PRESET) \
	    -p out $(abspath $(DEMO)) --no-progress-bar --log-output || exit 1; \
	  ../$(PY) -m jupyter nbconvert --to html --log-level WARN $(abspath $(DEMO))/$$nb.ipynb || exit 1; \
	done
	@echo "demo done: executed notebooks and their HTML copies in $(DEMO)/ (0*.ipynb, 0*.html); runs in $(DEMO)/stage*"

# The README's picture of notebook 03: taken by the real-browser test in Chromium.
screenshot: $(STAMP) chromium
	TCMLAB_SCREENSHOT=$(abspath docs/img/03_tradeoff_explorer.png) $(PY) -m pytest -q tests/test_browser.py

# Unit tests (with the real-browser test), then every notebook at the `ci` preset through nbval
# (notebooks/conftest.py gives them a temp folder).
test: $(STAMP) chromium
	$(PY) -m pytest -q tests
	cd notebooks && ../$(PY) -m pytest -q --nbval -p no:cacheprovider $$(ls [0-9]*.ipynb)  # not executed out*.ipynb copies

# GPU suite (tests/gpu): resume, live dFID, evaluate/sample, bf16/fp16, DDP with nccl. Skips with a reason without CUDA.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -rs -m gpu tests/gpu

bench: $(STAMP)
	$(PY) -m tcmlab.bench

# A sweep spec from sweeps/ (resumable: run it again to continue), e.g. make sweep SWEEP=digits_claims
SWEEP ?= ci
sweep: $(STAMP)
	$(PY) -m tcmlab sweep sweeps/$(SWEEP).toml

# The README's claims tables (TCM's claims on digits, 3 seeds; resumable): per sweep, the sweep, then its tables copied to
# docs/results/<sweep>/ and the report, figures and README block written from them (tests/test_claims.py checks that
# the README and the reports regenerate from the committed tables). digits_claims: about 75 minutes on 2 free cores;
# digits_long (stage 2 for 4,000 steps against the control): about 85 more. Then the recipe sweeps (their
# tables and summary.md are copied to docs/results/<sweep>/, which docs/results/digits_recipe.md quotes;
# tests/test_claims.py checks the quotes): digits_teacher (stage 0 6,000 + stage 1 12,000 steps, d ∈ {500, 250},
# then stage 2 and the control for 2,000 steps, 5 seeds; every score the mean of 10 noise draws), about 3 h 20 min,
# with a claims report and README block of its d = 250 chains (the claims pair one stage-1 run per seed with its
# stage 2); digits_fast (the digits preset's own 6,000 steps with the control, 3 seeds), under 30 minutes, with a
# claims report and README block (no curves: it sets no [eval] every); digits_fast_T80 (T = 80, TCM's T, against the
# preset's 10, with stages 1 and 2 of 3,000 and 1,000 steps: docs/decisions.md §18), under 30 minutes.
CLAIM_SWEEPS := digits_claims digits_long
RECIPE_SWEEPS := digits_teacher digits_fast digits_fast_T80
results: $(STAMP) chromium
	for s in $(CLAIM_SWEEPS); do \
	  $(PY) -m tcmlab sweep sweeps/$$s.toml --workers 2 && mkdir -p docs/results/$$s && \
	  cp runs/sweeps/$$s/results.csv runs/sweeps/$$s/curves.csv runs/sweeps/$$s/timing.csv \
	    runs/sweeps/$$s/summary.csv docs/results/$$s/ && \
	  $(PY) -m tcmlab claims sweeps/$$s.toml --out docs/results/$$s --md docs/results/$$s.md \
	    --figures docs/results/$$s --readme README.md --command "make results" || exit 1; \
	done
	for s in $(RECIPE_SWEEPS); do \
	  $(PY) -m tcmlab sweep sweeps/$$s.toml --workers 2 && mkdir -p docs/results/$$s && \
	  cp runs/sweeps/$$s/results.csv runs/sweeps/$$s/timing.csv runs/sweeps/$$s/summary.csv \
	    runs/sweeps/$$s/summary.md docs/results/$$s/ || exit 1; \
	  if [ -e runs/sweeps/$$s/curves.csv ]; then cp runs/sweeps/$$s/curves.csv docs/results/$$s/; fi; \
	done
	$(PY) -m tcmlab claims sweeps/digits_teacher.toml --out docs/results/digits_teacher --where s1.loss.d=250 \
	  --md docs/results/digits_teacher.md --figures docs/results/digits_teacher --readme README.md \
	  --command "make results"
	$(PY) -m tcmlab claims sweeps/digits_fast.toml --out docs/results/digits_fast --md docs/results/digits_fast.md \
	  --figures docs/results/digits_fast --readme README.md --command "make results"

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
