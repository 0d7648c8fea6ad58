# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment from the pinned requirements on first use.
PY := .venv/bin/python

.venv/done: requirements.txt requirements-test.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements-test.txt
	touch .venv/done

demo: .venv/done
	$(PY) generate.py

test: .venv/done
	$(PY) -m pytest -q

.PHONY: demo test
