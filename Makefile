# agentiso — build, test and demo entry points.  Run as root on Debian 12.
#   make demo    install what is missing, build the guest image, run a real session
#   make test    install what is missing, lint, run the whole test suite
SHELL := /bin/bash
.DEFAULT_GOAL := help
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
IMAGE ?= minimal
PYTEST_ARGS ?=

# Every Debian package the project needs on the build/test host.
APT_PACKAGES := python3 python3-venv python3-dev gcc make git \
	qemu-system-x86 qemu-utils debootstrap busybox-static cpio zstd lz4 kmod e2fsprogs \
	nftables iproute2 zfs-fuse util-linux systemd procps curl socat ca-certificates \
	dbus polkitd

PKG_DIRS := protocol frontend privhelper guest

.PHONY: help setup apt venv lint test unit integration image bench demo clean typecheck-tree docs

help:
	@echo "make demo   - install what is missing, build the guest image, run a real workspace session"
	@echo "make test   - install what is missing, lint, run the whole test suite"
	@echo "make image [IMAGE=minimal|dev] - build a guest image under build/images/"
	@echo "make bench  - run the benchmarks"
	@echo "make lint   - ruff + mypy"

setup: apt venv

# Installs only the packages that are missing; apt-get update only when needed.
apt:
	@missing=""
	for p in $(APT_PACKAGES); do
	  dpkg-query -W -f='$${Status}\n' "$$p" 2>/dev/null | grep -q '^install ok installed' || missing="$$missing $$p"
	done
	if [ -n "$$missing" ]; then
	  if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages:$$missing (run as root)" >&2; exit 1; fi
	  echo "installing:$$missing"
	  export DEBIAN_FRONTEND=noninteractive
	  apt-get update -q </dev/null
	  apt-get install -y -q --no-install-recommends $$missing </dev/null
	fi

venv: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	[ -x $(VPY) ] || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -U pip </dev/null
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[dev]' </dev/null
	touch $@

# mypy maps files to modules by directory; the packages live in top-level
# folders, so it checks them through a tree of symlinks named like the imports.
typecheck-tree:
	mkdir -p build/typecheck/agentiso
	for d in $(PKG_DIRS); do ln -sfn ../../../$$d build/typecheck/agentiso/$$d; done

lint: venv typecheck-tree
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy $(addprefix -p agentiso.,$(PKG_DIRS)) -p images

# The tool reference, from the live tool schemas (a unit test checks it is current).
docs: venv
	$(VPY) -m agentiso.frontend.tooldoc > docs/tools.md

image: apt venv
	$(MAKE) -C images IMAGE=$(IMAGE) PYTHON=$(abspath $(VPY))

# pytest exits 5 when a selection ran nothing; that is not a failure here.
define run_pytest
	rc=0; $(VPY) -m pytest $(1) || rc=$$?; [ $$rc = 0 ] || [ $$rc = 5 ] || exit $$rc
endef

unit: venv
	$(call run_pytest,tests/unit $(PYTEST_ARGS))

# The agent-workflow tests need the dev image (git) besides the default one.
test: setup lint image
	$(MAKE) image IMAGE=dev
	$(call run_pytest,tests --durations=25 $(PYTEST_ARGS))

bench: setup image
	$(VPY) -m bench

# A real session (create, exec, files, snapshot, fork, restore, destroy) through
# a private helper in its own network namespace; leaves nothing behind.
demo: setup
	$(MAKE) image IMAGE=minimal
	$(VPY) scripts/demo.py

clean:
	rm -rf build
