# The two commands of the README: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint bench bench-peers clean

$(BIN)/trainfleet: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[server,postgres,zstd,s3,examples,dev]'
	touch $@

demo: $(BIN)/trainfleet      ## a real fleet on loopback: receiver, two workers, real training
	$(BIN)/trainfleet demo

lint: $(BIN)/trainfleet
	$(BIN)/ruff check .
	$(BIN)/mypy src

test: lint                   ## the whole suite, slow tests included
	$(BIN)/pytest -q

bench: $(BIN)/trainfleet     ## ours vs floors measured in the same run; BENCH_ARGS=--quick for a short one
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-peers: $(BIN)/trainfleet  ## huey, RQ, raw SKIP LOCKED vs ours; PEERS_ARGS=--help
	$(BIN)/python -m pip install -q -r bench/peers/requirements.txt
	$(BIN)/python -m bench.peers $(PEERS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
