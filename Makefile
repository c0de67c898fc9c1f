# The two commands: `make demo` (set up, then run the main job) and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
ROM    ?= cartridge/pokedreamer.gb
OUT    ?= outputs/demo

.PHONY: setup test demo cartridge sdcc clean

# demo budget: collected steps and minutes of world-model training (about 25 minutes in all on 2 cores)
DEMO_STEPS          ?= 20000
DEMO_EPISODE_LENGTH ?= 500
DEMO_MINUTES        ?= 20
DEMO_PRESET         ?= default
# torch CPU threads (0: torch's default; use 1 when other jobs share the cores)
DEMO_THREADS        ?= 0

$(VENV)/.installed: requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or pass PYTHON=/path/to/python3.11"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

# SDCC (sm83 port) rebuilds the cartridge; Debian's package, installed when missing.
sdcc:
	@command -v sdcc >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq sdcc >/dev/null; }

cartridge: sdcc
	$(MAKE) -C cartridge

test: setup sdcc
	$(PY) -m pytest -q

# The main job: start state, collection, world-model training, side-by-side video, drift/PSNR table and plots.
demo: setup
	$(PY) scripts/make_save_state.py --rom $(ROM) --out $(OUT)/start.state
	$(PY) scripts/collect_data.py --rom $(ROM) --save-state $(OUT)/start.state --policy explore \
	    --total-steps $(DEMO_STEPS) --episode-length $(DEMO_EPISODE_LENGTH) --save-interval 2500 --workers 2 --out-dir $(OUT)/data
	$(PY) scripts/train_rssm.py --data-dir $(OUT)/data --out-dir $(OUT)/rssm --epochs 1000 --batch-size 8 --time-budget $(DEMO_MINUTES) \
	    --preset $(DEMO_PRESET) --threads $(DEMO_THREADS)
	$(PY) scripts/generate_demo_video_v2.py --rom $(ROM) --checkpoint $(OUT)/rssm/best_world_model.pt \
	    --save-state $(OUT)/start.state --out-video $(OUT)/side_by_side.mp4 --gif $(OUT)/side_by_side.gif
	$(PY) scripts/evaluate_rssm.py --checkpoints $(OUT)/rssm/best_world_model.pt --data-dir $(OUT)/data --out-dir $(OUT)/eval
	@echo "demo outputs in $(OUT)/: side_by_side.mp4 / .gif, rssm/ (checkpoints, metrics, loss plot), eval/ (drift table, plots)"

clean:
	rm -rf $(VENV) outputs
