# `make demo`: install, train the tiny preset on input.txt (or the default corpus), quantize, serve the app.
# `make serve`: serve the int8 model `make demo` wrote last, without training again.
# `make test`: install and run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out
MINUTES ?= 3

.PHONY: install install-llama-cpp test demo serve clean

install: $(VENV)/.installed

# torch goes in first, as the CPU build: a bare `torch` requirement would pull a multi-GB CUDA build. Where pip's
# index has no CPU wheel of torch (plain PyPI on Linux), use PyTorch's CPU index:
#   make install TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# Optional: llama-cpp-python, a second llama.cpp binding for the test that runs an exported GGUF in llama.cpp itself
# (`make install` already brings xllamacpp's prebuilt wheel for it). pip compiles llama.cpp from source (about 18
# minutes on 2 cores), so neither `make install` nor CI installs it.
install-llama-cpp: install
	$(PY) -m pip install -q llama-cpp-python

test: install
	$(PY) -m pytest

# Trains on ./input.txt if present, else the default corpus; the app prints its local URL (Ctrl+C stops it).
# The tiny preset is tuned for few CPU minutes (bench/quality.py); DEMO_TRAIN_FLAGS passes extra train.py flags.
DEMO_TRAIN_FLAGS ?=
demo: install
	$(PY) train.py --preset tiny --time-budget-min $(MINUTES) $(DEMO_TRAIN_FLAGS) --output-dir $(OUT)/toygpt --overwrite
	$(PY) quantize.py $(OUT)/toygpt $(OUT)/toygpt-int8 --overwrite
	@printf '%s\n' "demo: done. Produced (details in the two summaries above):" \
		"  $(OUT)/toygpt        the fp32 model (card README.md, loss_curve.png, metrics.jsonl, runs/)" \
		"  $(OUT)/toygpt-int8   its int8 copy, served now" \
		"next:" \
		"  # reopen the app later without retraining" \
		"  make serve" \
		"  # publish both and the Space (HF_TOKEN or \`hf auth login\`)" \
		"  $(PY) push_to_hub.py --model-dir $(OUT)/toygpt --quantized-dir $(OUT)/toygpt-int8 --repo-id USER/toygpt --space-id USER/toygpt-demo" \
		"The app starts below; open its URL in a browser. Ctrl+C stops it."
	TOYGPT_MODEL=$(OUT)/toygpt-int8 $(PY) space/app.py

# Serves $(OUT)/toygpt-int8 as it is (no training, no quantizing); the app prints its local URL (Ctrl+C stops it).
serve: install
	@test -f $(OUT)/toygpt-int8/config.json || { echo "serve: no model in $(OUT)/toygpt-int8; run \`make demo\` first" \
		"(it trains and quantizes one), or serve another with TOYGPT_MODEL=DIR $(PY) space/app.py" >&2; exit 2; }
	TOYGPT_MODEL=$(OUT)/toygpt-int8 $(PY) space/app.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
