# Bulwark: the commands CI and newcomers use. One cargo profile (dev, lightly optimised)
# serves tests, binaries and `make run`, so nothing is compiled twice.
CARGO ?= cargo
FUZZ_SECONDS ?= 30

.PHONY: all build run certs test test-rust fuzz-smoke lint fmt clean deb

all: build

build:
	$(CARGO) build --workspace --bins

## The whole system on loopback: broker, two gateways (agent + producer), the consumer;
## certificates created on first use under certs/dev, data under data/. Ctrl-C stops it.
run: build
	./scripts/dev-run.sh

## Development PKI: root CA, server certificate, one application client certificate.
certs: build
	./target/debug/bulwark-pki init --dir certs/dev --client app1

## Everything CI runs: unit, property, integration and interop tests, corpus replay,
## and a short fuzzing run of every fuzz target.
test: build test-rust fuzz-smoke

test-rust:
	timeout 1500 $(CARGO) test --workspace

fuzz-smoke:
	./scripts/fuzz-smoke.sh $(FUZZ_SECONDS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean

## Debian packages bulwark-broker and bulwark-agent in target/debian/ (dpkg-deb, no extra
## tool). Packages the target/debug binaries; `make deb PROFILE=release` for a plant.
deb:
	./scripts/build-deb.sh all
