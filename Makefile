# Set-up and everyday commands; each creates .venv on first use.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

$(VENV_STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(VENV_STAMP)

.PHONY: install demo test bench
install: $(VENV_STAMP)

demo: $(VENV_STAMP)
	.venv/bin/unmerge demo

test: $(VENV_STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

bench: $(VENV_STAMP)
	$(PY) benchmarks/speed.py
