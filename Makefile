# `make demo` and `make test` set up their own virtual environment (.venv) on first use:
# the demo needs only the runtime requirements; the tests add torch, pytorch-fid and pytest.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime-installed
DEV := $(VENV)/.installed

.PHONY: setup demo test parity bench clean

$(RUNTIME): requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $(RUNTIME)

$(DEV): $(RUNTIME) requirements-dev.txt
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $(DEV)

setup: $(DEV)

demo: $(RUNTIME)
	$(BIN)/python -m cca_jax.main --config=configs/demo.py --workdir=runs/demo

test: $(DEV)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

parity: $(DEV)
	$(BIN)/python -m pytest -q -m parity

bench: $(RUNTIME)  # figures quoted in README "Performance" (several minutes each)
	$(BIN)/python -m cca_jax.bench.step
	$(BIN)/python -m cca_jax.bench.sample_llamagen
	$(BIN)/python -m cca_jax.bench.sample_var --skip_recompute
	$(BIN)/python -m cca_jax.bench.decode_roofline

clean:
	rm -rf $(VENV) runs
