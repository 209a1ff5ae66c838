# agentiso — build, test and demo entry points.  Run as root on Debian 12.
#   make demo    install what is missing, build the guest image, run a real session
#   make test    install what is missing, lint, run the whole test suite
#   make install / make uninstall   agentiso system-wide (root), and back out
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

.PHONY: help setup apt venv lint test unit integration image bench demo clean typecheck-tree docs \
	install uninstall lock image-minimal

help:
	@echo "make demo   - install what is missing, build the guest image, run a real workspace session"
	@echo "make test   - install what is missing, lint, run the whole test suite"
	@echo "make image [IMAGE=minimal|dev] - build a guest image under build/images/"
	@echo "make bench  - run the benchmarks"
	@echo "make lint   - ruff + mypy"
	@echo "make install / make uninstall [DESTDIR=... PREFIX=...] - system-wide (root)"
	@echo "make lock   - refresh requirements*.lock (hashed pins) within pyproject's ranges"

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

# Exactly the hashed versions of the lock, then this checkout (editable, no deps).
$(VENV)/.stamp: pyproject.toml requirements-dev.lock
	[ -x $(VPY) ] || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -U pip </dev/null
	$(VPY) -m pip install -q --disable-pip-version-check --require-hashes -r requirements-dev.lock </dev/null
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps -e . </dev/null
	touch $@

# The lock files: every dependency pinned with its hashes (pip-tools, in a
# throwaway venv).  --upgrade takes the newest versions pyproject.toml allows.
LOCKENV := build/lockenv
PIP_COMPILE := $(LOCKENV)/bin/pip-compile -q --generate-hashes --strip-extras --upgrade \
	--no-emit-index-url --no-emit-find-links --no-emit-trusted-host
lock:
	[ -x $(LOCKENV)/bin/pip-compile ] || { $(PYTHON) -m venv $(LOCKENV) && \
	  $(LOCKENV)/bin/pip install -q --disable-pip-version-check pip-tools </dev/null; }
	$(PIP_COMPILE) -o requirements.lock pyproject.toml </dev/null
	$(PIP_COMPILE) --extra dev -o requirements-dev.lock pyproject.toml </dev/null

# mypy maps files to modules by directory; the packages live in top-level
# folders, so it checks them through a tree of symlinks named like the imports.
typecheck-tree:
	mkdir -p build/typecheck/agentiso
	for d in $(PKG_DIRS); do ln -sfn ../../../$$d build/typecheck/agentiso/$$d; done

lint: venv typecheck-tree
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy $(addprefix -p agentiso.,$(PKG_DIRS)) -p images

# The tool and configuration references, from the live tool schemas and the config
# structs (unit tests check both are current).
docs: venv
	$(VPY) -m agentiso.frontend.tooldoc > docs/tools.md
	$(VPY) scripts/configdoc.py > docs/configuration.md

image: apt venv
	$(MAKE) -C images IMAGE=$(IMAGE) PYTHON=$(abspath $(VPY))

# pytest exits 5 when a selection ran nothing; that is not a failure here.
define run_pytest
	rc=0; $(VPY) -m pytest $(1) || rc=$$?; [ $$rc = 0 ] || [ $$rc = 5 ] || exit $$rc
endef

unit: venv
	$(call run_pytest,tests/unit $(PYTEST_ARGS))

# The agent-workflow tests need the dev image (git) besides the default one.
# scripts/run_tests.py runs the integration modules two at a time, each its own
# pytest (10 min instead of 16); AGENTISO_TEST_JOBS=1 runs one plain pytest.
test: setup lint image
	$(MAKE) image IMAGE=dev
	$(VPY) scripts/run_tests.py -p no:cacheprovider --durations=25 $(PYTEST_ARGS)

bench: setup image
	$(VPY) -m bench

# A real session (create, exec, files, snapshot, fork, restore, destroy) through
# a private helper in its own network namespace; leaves nothing behind.
demo: setup image-minimal
	$(VPY) scripts/demo.py

image-minimal:
	$(MAKE) image IMAGE=minimal

# System-wide: a venv under $(PREFIX) from requirements.lock, commands in
# /usr/local/bin, systemd units, sysusers group, polkit policy and rules,
# /etc/agentiso/helper.toml, the built images; a manifest for uninstall.
PREFIX ?= /opt/agentiso
DESTDIR ?=
# (The image is a prerequisite, not a $(MAKE) line of this recipe: with
# .ONESHELL, make -n would run a whole recipe that contains $(MAKE).)
install: setup image-minimal
	images=""
	for i in minimal dev; do
	  if [ -f build/images/$$i/rootfs.img ]; then images="$$images --image build/images/$$i"; fi
	done
	$(VPY) scripts/install.py install --prefix '$(PREFIX)' --destdir '$(DESTDIR)' $$images

uninstall:
	$(PYTHON) scripts/install.py uninstall --prefix '$(PREFIX)' --destdir '$(DESTDIR)'

clean:
	rm -rf build
