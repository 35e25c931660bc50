# Aegis build. `make demo` and `make test` each do all their own set-up.
SHELL := /bin/bash
AEGIS_HOME ?= $(HOME)/.aegis
export AEGIS_HOME
CACHE := $(AEGIS_HOME)/cache
HARNESS_BUNDLE := packages/harness/dist/harness.mjs

.PHONY: all deps node_modules aegisd aegis harness sdk ui kernel base-rootfs demo test check bench clean

all: deps aegisd aegis harness sdk ui kernel base-rootfs

deps:
	@scripts/setup.sh

node_modules/.package-lock.json: package.json package-lock.json
	npm ci --no-audit --no-fund
node_modules: node_modules/.package-lock.json

# tsc -b builds each package with the packages it depends on.
aegisd: node_modules
	npx tsc -b packages/daemon
aegis: node_modules
	npx tsc -b packages/cli
	npm run build -w @aegis/cli --silent
harness: node_modules
	npx tsc -b packages/harness
	npm run build -w @aegis/harness --silent
sdk: node_modules
	npx tsc -b packages/sdk
	npm run build -w @aegis/sdk --silent
# The dashboard's browser bundle (packages/ui/dist), served by aegisd under AEGIS_UI_ADDR.
ui: node_modules
	npx tsc -b packages/ui
	npm run build -w @aegis/ui --silent

kernel: deps
	@guest/kernel/build.sh "$(CACHE)" >/dev/null
	@echo "kernel: $$(readlink -f $(CACHE)/kernel/vmlinux)"

base-rootfs: deps harness
	@guest/rootfs/build.sh $(HARNESS_BUNDLE) packages/harness/native/init.c "$(CACHE)" >/dev/null
	@echo "rootfs: $$(readlink -f $(CACHE)/rootfs/base.erofs)"

demo: all
	@./bin/aegis up
	./bin/aegis run -- echo hello

test: all
	npm run typecheck
	npm run lint
	npm test

check: all
	npm run check

bench: all
	npm run bench

clean:
	rm -rf packages/*/dist packages/*/tsconfig.tsbuildinfo
