# Two entry points: `make demo` (set up the venv, compile SmolLM2-135M, chat) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo

.PHONY: setup redis-server libibverbs test demo clean

# `setup` is what the tests need: the venv plus redis-server and libibverbs. The demo needs only the
# venv, so it never installs OS packages (which needs root or sudo).
setup: $(STAMP) redis-server libibverbs

# The engine-registry tests run a real redis-server; install it from the OS packages when missing
# (sudo only when not root and sudo exists).
SUDO := $(shell [ "$$(id -u)" = 0 ] || ! command -v sudo >/dev/null || echo sudo)
redis-server:
	@command -v redis-server >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "make setup: please install redis-server (the tests run one)" >&2; exit 1; }; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

# dlslime (the dlslime KV transport's tests) loads libibverbs and libnuma even on hosts without an
# RDMA NIC; install them the same way when the dynamic linker does not know them.
LDCONFIG := $(shell command -v ldconfig || echo /sbin/ldconfig)
libibverbs:
	@{ $(LDCONFIG) -p | grep -q 'libibverbs\.so\.1 ' && $(LDCONFIG) -p | grep -q 'libnuma\.so\.1 '; } || { \
	  command -v apt-get >/dev/null || { echo "make setup: please install libibverbs1 and libnuma1 (dlslime loads them)" >&2; exit 1; }; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1 libnuma1; }

# torch 2.13.0 first: on the CPU machines it is a CPU build from local disk, and installing it
# before the project keeps pip from pulling a multi-GB CUDA build to satisfy `torch>=...`.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	@GGUF=$$($(BIN)/python scripts/fetch_smollm2.py .cache/smollm2) && \
	echo "== compile $$GGUF" && \
	$(BIN)/nanoforge compile $$GGUF -o $(DEMO)/smollm2-plan --dump-dir $(DEMO)/passes --verify-each-pass && \
	echo "== pass dumps in $(DEMO)/passes:" && cat $(DEMO)/passes/index.txt && \
	echo "== inspect" && $(BIN)/nanoforge inspect $(DEMO)/smollm2-plan && \
	echo "== chat: What is the capital of France?" && \
	$(BIN)/nanoforge generate $(DEMO)/smollm2-plan --chat --prompt "What is the capital of France?" --max-tokens 48

clean:
	rm -rf $(DEMO) .pytest_cache
