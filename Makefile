# SYPAS — build, test, benchmark and fuzz targets.
# Everything here works on a fresh clone with only the Go toolchain installed.

GO        ?= go
FUZZTIME  ?= 30s
FUZZFLAGS ?=            # e.g. FUZZFLAGS=-parallel=1 to leave a core free
BENCHTIME ?= 1s
BENCH     ?= .
PKGS      := ./...

.PHONY: all demo test test-race test-stress bench fuzz grpcurl-check lint tidy clean

all: lint test

## demo: a kernel and two daemon processes calling, refused, subscribing over the
## shared-memory rings, then calls measured against a Unix socket
demo:
	$(GO) run ./cmd/sypas demo

## test: vet, the race-enabled suite, the bridge's suite again inline on the
## Unix socket and over TCP with TLS (about 20 s each; tests that need rings
## skip), the full-size cross-process stress tests, and one iteration of every
## benchmark so none of them rots
test: lint
	$(GO) test -race -count=1 -timeout 10m $(PKGS)
	SYPAS_TRANSPORT=inline $(GO) test -race -count=1 -timeout 5m ./sypas/
	SYPAS_TRANSPORT=tls $(GO) test -race -count=1 -timeout 5m ./sypas/
	SYPAS_STRESS=full $(GO) test -count=1 -timeout 10m -run 'Stress|CrossProcess' ./ring/ ./futex/
	$(GO) test -count=1 -timeout 5m -run '^$$' -bench . -benchtime 1x $(PKGS) > /dev/null

## bench: every benchmark, one run, side by side with the baselines
bench:
	$(GO) test -run '^$$' -bench '$(BENCH)' -benchtime $(BENCHTIME) -count 1 $(PKGS)

## fuzz: run every fuzz target for FUZZTIME each, one after another: those of
## ./fuzz, and the two that need a package's internals (the token parser, the
## gRPC transport's codec)
FUZZPKGS  ?= ./fuzz/ ./control/token/ ./sypasgrpc/
fuzz:
	@set -e; for p in $(FUZZPKGS); do \
		for t in $$($(GO) test -list '^Fuzz' $$p | grep '^Fuzz'); do \
			echo "== $$p $$t ($(FUZZTIME))"; \
			$(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) $(FUZZFLAGS) $$p; \
		done; \
	done

## grpcurl-check: the gRPC service as grpcurl sees it (list, describe, calls,
## health, a subscription) against "sypas serve -grpc" with mutual TLS: builds
## grpcurl GRPCURL_VERSION into a temporary directory (go install, which leaves
## this module's go.mod alone; needs the network, or offline a module cache
## that holds it and GOPROXY=file://$(go env GOMODCACHE)/cache/download:
## GOPROXY=off fails looking up the module's deprecation) and runs cmd/sypas's
## TestGRPCurl with it. Not part of make test, where that test skips unless
## grpcurl is on PATH.
GRPCURL_VERSION ?= v1.9.4
grpcurl-check:
	@set -e; bin=$$(mktemp -d); trap 'rm -rf "$$bin"' EXIT; \
		GOBIN=$$bin $(GO) install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION); \
		$(GO) version -m $$bin/grpcurl | awk '$$1 == "mod" { print "built", $$2, $$3 }'; \
		GRPCURL=$$bin/grpcurl $(GO) test -count=1 -v -run '^TestGRPCurl$$' ./cmd/sypas/

## lint: formatting and vet
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
		if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)

tidy:
	$(GO) mod tidy

clean:
	$(GO) clean -testcache
