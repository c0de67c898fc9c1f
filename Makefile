# The two commands: `make demo` (set up, then run the main job) and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
ROM    ?= cartridge/pokedreamer.gb
OUT    ?= outputs/demo

.PHONY: setup test demo demo-v1 cartridge sdcc clean

# demo budget: collected steps and minutes of world-model training (26.5 minutes in all on 2 cores, session 33); 60,000 steps
# (40,000 of them took 28.7 s to collect in session 32) instead of 20,000 since session 32: 3x the episodes drift less, by the probe under #6's
# 1 / 2 tiles at steps 29 / 50 on three seeds (README, session 32)
DEMO_STEPS          ?= 60000
DEMO_EPISODE_LENGTH ?= 500
DEMO_MINUTES        ?= 20
# world-model preset: default (two local latents a cell; session 30, bfloat16 CPUs) or global (session 28's default,
# which drifted less in float32 on an AVX2 CPU)
DEMO_PRESET         ?= default
# training precision (RSSMConfig.train_precision): auto = bfloat16 where the CPU or GPU computes it natively, else
# float32; at batch 16 bfloat16 drifted less at step 50 (3.02 against 3.45 tiles, five seeds against three; README, session 21)
DEMO_PRECISION      ?= auto
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
	$(PY) scripts/train_rssm.py --data-dir $(OUT)/data --out-dir $(OUT)/rssm --epochs 1000 --batch-size 16 --time-budget $(DEMO_MINUTES) \
	    --preset $(DEMO_PRESET) --set train_precision=$(DEMO_PRECISION) --threads $(DEMO_THREADS)
	$(PY) scripts/generate_demo_video_v2.py --rom $(ROM) --checkpoint $(OUT)/rssm/best_world_model.pt \
	    --save-state $(OUT)/start.state --out-video $(OUT)/side_by_side.mp4 --gif $(OUT)/side_by_side.gif
	$(PY) scripts/evaluate_rssm.py --checkpoints $(OUT)/rssm/best_world_model.pt --data-dir $(OUT)/data --out-dir $(OUT)/eval
	@echo "demo outputs in $(OUT)/: side_by_side.mp4 / .gif, rssm/ (checkpoints, metrics, loss plot), eval/ (drift table, plots)"

# v1 end to end, the README's "v1" chain: 36x40 explorer data, VAE, RAM probe, dynamics with scheduled
# sampling (SS) and its teacher-forcing ablation (TF), the drift table with snapped rollouts, and the
# planner table (CEM with belief state and snapping vs the original's MPC, greedy and random).
# Roughly 40 minutes on 2 cores at these budgets; V1_STEPS=10000 V1_VAE_EPOCHS=1 V1_GOALS=4 is a 6-minute taste.
V1_OUT        ?= outputs/demo_v1
V1_STEPS      ?= 100000
V1_VAE_EPOCHS ?= 3
V1_GOALS      ?= 40
V1_DATA       := $(V1_OUT)/data
V1_NETS       := --vae-checkpoint $(V1_OUT)/vae/best_vae.pt --probe-checkpoint $(V1_OUT)/probe/best_probe.pt

demo-v1: setup
	$(PY) scripts/collect_data.py --rom $(ROM) --policy explore --total-steps $(V1_STEPS) --episode-length 1000 \
	    --save-interval 5000 --seed 2 --resolution 36x40 --workers 2 --out-dir $(V1_DATA)
	$(PY) scripts/train_vae.py --data-dir $(V1_DATA) --epochs $(V1_VAE_EPOCHS) --out-dir $(V1_OUT)/vae
	$(PY) scripts/train_probe.py --data-dir $(V1_DATA) --vae-checkpoint $(V1_OUT)/vae/best_vae.pt --out-dir $(V1_OUT)/probe
	$(PY) scripts/train_dynamics.py --data-dir $(V1_DATA) --vae-checkpoint $(V1_OUT)/vae/best_vae.pt --window-stride 10 \
	    --out-dir $(V1_OUT)/dynamics_ss
	$(PY) scripts/train_dynamics.py --data-dir $(V1_DATA) --vae-checkpoint $(V1_OUT)/vae/best_vae.pt --window-stride 10 \
	    --no-scheduled-sampling --out-dir $(V1_OUT)/dynamics_tf
	$(PY) scripts/evaluate_drift.py --data-dir $(V1_DATA) $(V1_NETS) --checkpoint $(V1_OUT)/dynamics_ss/best_dynamics.pt \
	    --ablation-checkpoint $(V1_OUT)/dynamics_tf/best_dynamics.pt --snap --out-dir $(V1_OUT)/drift
	$(PY) scripts/run_planner.py --rom $(ROM) $(V1_NETS) --checkpoint $(V1_OUT)/dynamics_ss/best_dynamics.pt --belief \
	    --snap-data $(V1_DATA) --execute-steps 1 --goals $(V1_GOALS) --start-walk 150 --start-states 10 --out-dir $(V1_OUT)/planner
	@echo "v1 outputs in $(V1_OUT)/: drift/drift.md (SS vs TF, snapped), planner/planner.md, and every stage's checkpoints and plots"

clean:
	rm -rf $(VENV) outputs
