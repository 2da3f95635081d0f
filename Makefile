# Bulwark: the commands CI and newcomers use. One cargo profile (dev, lightly optimised)
# serves tests, binaries and `make run`, so nothing is compiled twice.
CARGO ?= cargo
FUZZ_SECONDS ?= 30
## Extra names and addresses for the development broker certificate: make certs SERVER_NAMES="broker.example 10.0.4.20"
SERVER_NAMES ?=

.PHONY: all build run certs test test-rust test-scripts fuzz-smoke lint fmt clean deb bench

all: build

build:
	$(CARGO) build --workspace --bins

## The whole system on loopback: broker, two gateways (agent + producer), the consumer;
## certificates created on first use under certs/dev, data under data/. Ctrl-C stops it.
run: build
	./scripts/dev-run.sh

## Development PKI: root CA, server certificate, one application client certificate.
certs: build
	./target/debug/bulwark-pki init --dir certs/dev $(foreach n,$(SERVER_NAMES),--server-name $(n)) \
	    --client app1 --client gw-1 --client gw-2 --client alice

## Everything CI runs: unit, property, integration and interop tests, corpus replay,
## and a short fuzzing run of every fuzz target.
test: build test-rust test-scripts fuzz-smoke compose-test

test-rust:
	timeout 1500 $(CARGO) test --workspace

## The benchmark script's own unit tests (median, ratios, report, SVG).
test-scripts:
	python3 -m unittest scripts/test_bench.py

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

## Benchmarks: bulwark-broker beside Mosquitto and rumqttd (installed if missing) with the
## load generator bulwark-bench, plus the agent and tunnel figures; writes BENCHMARKS.md and
## bench/ratios.svg, raw results in bench/.run/. Release binaries (the dev profile would
## measure the wrong thing). Quick run: BENCH_SCALE=0.1 BENCH_ROUNDS=1 make bench; other
## knobs (BENCH_ONLY, BENCH_BROKERS, ...) are described at the top of scripts/bench.py.
bench:
	$(CARGO) build --release --workspace --bins
	python3 scripts/bench.py

## --- Containers: the compose topology (deploy/docker-compose.yml, deploy/docker/README.md)
## Docker Compose, whichever is installed (docker-compose or the docker compose plugin).
COMPOSE ?= ./deploy/docker/compose.sh
COMPOSE_PROJECT ?= bulwark
COMPOSE_CMD = $(COMPOSE) -f deploy/docker-compose.yml -p $(COMPOSE_PROJECT)

.PHONY: images compose-certs compose-up compose-down compose-test

## Images, with no registry: the base by debootstrap (scripts/build-base-image.sh, once),
## the Debian packages (scripts/build-deb.sh), then docker build of broker, gateway,
## firewall, consumer and probe.
images: build
	./deploy/docker/build-images.sh

## Certificates of the topology in deploy/.compose (git-ignored), made with bulwark-pki.
compose-certs: build
	./deploy/docker/compose-certs.sh

## The topology as containers on field, dmz and enterprise networks; prints where to look.
compose-up: images compose-certs
	COMPOSE_PROJECT=$(COMPOSE_PROJECT) ./deploy/docker/compose-up.sh

compose-down:
	$(COMPOSE_CMD) down -v --remove-orphans

## The end-to-end scenarios on the topology (integration-tests/tests/compose.rs), with
## freshly built images. BULWARK_SKIP_COMPOSE=1 skips them (developers without Docker).
## --workspace: the same dependency features as test-rust, so nothing is compiled twice.
compose-test: build
	@if [ "$${BULWARK_SKIP_COMPOSE:-0}" = 1 ]; then \
		echo "compose-test: skipped (BULWARK_SKIP_COMPOSE=1)"; \
	else \
		./deploy/docker/build-images.sh; \
	fi
	timeout 1800 $(CARGO) test --workspace --test compose -- \
		--ignored --test-threads=1 --nocapture
