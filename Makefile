# instar: `make` builds release libinstar.so and the instar CLI into build/; `make test` installs what it needs
# and runs every suite; `make demo` shows the main job on an image it makes itself.
SWIFT   ?= swift
PYTHON  ?= /usr/bin/python3
PREFIX  ?= /usr/local
OUT     := build
RELEASE := -c release -Xswiftc -static-stdlib
APT_PKGS := zlib1g-dev libzstd-dev libgcrypt20-dev qemu-utils python3-pytest python3-pytest-xdist pkg-config strace gdb
APT_PKGS += python3-venv python3-pip python3-setuptools python3-wheel mypy
APT_PKGS += libbz2-dev
# RBD (issue 15): librbd to link and qemu-img's rbd driver; the cluster packages come from ceph-deps below.
APT_PKGS += librbd-dev librados-dev qemu-block-extra
APT_PKGS += libnbd-dev libnbd-bin nbdkit

.PHONY: all deps build dev test unit-test diff-test demo fuzz bench install install-only clean wheel wheel-only

all: build

build:
	$(SWIFT) build $(RELEASE) --product instar
	$(SWIFT) build $(RELEASE) --product instar-cli
	mkdir -p $(OUT)/bin $(OUT)/lib
	cp .build/release/libinstar.so $(OUT)/lib/libinstar.so.new && mv -f $(OUT)/lib/libinstar.so.new $(OUT)/lib/libinstar.so
	cp .build/release/instar-cli $(OUT)/bin/instar.new && mv -f $(OUT)/bin/instar.new $(OUT)/bin/instar
	$(SWIFT) build $(RELEASE) --product instar-isolate
	mkdir -p $(OUT)/libexec
	cp .build/release/instar-isolate $(OUT)/libexec/instar-isolate.new && mv -f $(OUT)/libexec/instar-isolate.new $(OUT)/libexec/instar-isolate

# Debug build into the same build/ folder, for quick iteration (not static; needs the Swift toolchain).
dev:
	$(SWIFT) build --product instar
	$(SWIFT) build --product instar-cli
	mkdir -p $(OUT)/bin $(OUT)/lib
	cp .build/debug/libinstar.so $(OUT)/lib/libinstar.so.new && mv -f $(OUT)/lib/libinstar.so.new $(OUT)/lib/libinstar.so
	cp .build/debug/instar-cli $(OUT)/bin/instar.new && mv -f $(OUT)/bin/instar.new $(OUT)/bin/instar
	$(SWIFT) build --product instar-isolate
	mkdir -p $(OUT)/libexec
	cp .build/debug/instar-isolate $(OUT)/libexec/instar-isolate.new && mv -f $(OUT)/libexec/instar-isolate.new $(OUT)/libexec/instar-isolate

# Installs the system packages the build and the tests need, only when some are missing.
deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

test: deps build unit-test diff-test
# (make test also runs consumer-test: see the consumer suites block at the end)

unit-test:
	$(SWIFT) test

diff-test:
	scripts/ceph-single-node.sh run env INSTAR_BUILD=$(CURDIR)/$(OUT) $(PYTHON) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=25 Tests/diff

demo: deps build
	bash bench/demo.sh $(OUT)/bin/instar

fuzz: deps
	bash fuzz/run.sh

bench: deps build
	$(PYTHON) bench/run.py --build $(OUT)

install: build install-only

# The install steps alone, from whatever build/ holds (tests install a debug build this way).
install-only:
	install -d $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib/pkgconfig
	install -m 0755 $(OUT)/lib/libinstar.so $(DESTDIR)$(PREFIX)/lib/libinstar.so
	install -m 0644 include/instar.h $(DESTDIR)$(PREFIX)/include/instar.h
	install -m 0755 $(OUT)/bin/instar $(DESTDIR)$(PREFIX)/bin/instar
	install -d $(DESTDIR)$(PREFIX)/libexec
	install -m 0755 $(OUT)/libexec/instar-isolate $(DESTDIR)$(PREFIX)/libexec/instar-isolate
	sed -e 's|@PREFIX@|$(PREFIX)|g' -e "s|@VERSION@|$$(sed -n 's/.*version = \"\(.*\)\".*/\1/p' Sources/Instar/Instar.swift)|g" \
	  pkgconfig/instar.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/instar.pc

clean:
	rm -rf .build $(OUT)

# Consumer suites (issue 8): ovirt-imageio's and oslo.utils' own tests that run qemu-img, once with qemu-img and
# once with instar as `qemu-img`, compared by Tests/consumers/run.py against Tests/consumers/expected_failures.txt
# (Tests/consumers/README.md). The virtualenv and the unpacked sdist live in build/consumers, made only when
# missing or when requirements.txt changes. CONSUMERS_ARGS passes options to run.py (e.g. --update-expected).
CONSUMERS      := $(OUT)/consumers
CONSUMERS_VENV := $(CONSUMERS)/venv
OVIRT_IMAGEIO  := 2.5.1
CONSUMER_APT_PKGS := python3-venv python3-dev gcc genisoimage qemu-system-x86
CONSUMERS_ARGS ?=

.PHONY: consumer-deps consumer-test
test: consumer-test

consumer-deps:
	@missing=""; for p in $(CONSUMER_APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(CONSUMERS)/.ready-$(OVIRT_IMAGEIO): Tests/consumers/requirements.txt | consumer-deps
	rm -rf $(CONSUMERS)
	$(PYTHON) -m venv $(CONSUMERS_VENV)
	$(CONSUMERS_VENV)/bin/pip install -q --disable-pip-version-check -r Tests/consumers/requirements.txt
	$(CONSUMERS_VENV)/bin/pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
	  -d $(CONSUMERS)/sdist ovirt-imageio==$(OVIRT_IMAGEIO)
	tar -C $(CONSUMERS) -xzf $(CONSUMERS)/sdist/ovirt_imageio-$(OVIRT_IMAGEIO).tar.gz
	cd $(CONSUMERS)/ovirt_imageio-$(OVIRT_IMAGEIO) && ../venv/bin/python setup.py -q build_ext --build-lib .
	touch $@

consumer-test: deps consumer-deps build $(CONSUMERS)/.ready-$(OVIRT_IMAGEIO)
	$(PYTHON) Tests/consumers/run.py --python $(CONSUMERS_VENV)/bin/python \
	  --ovirt-src $(CONSUMERS)/ovirt_imageio-$(OVIRT_IMAGEIO) --instar $(OUT)/bin/instar \
	  --out $(CONSUMERS)/results $(CONSUMERS_ARGS)

# A wheel of the Python package with build/lib/libinstar.so inside (instar/_native/), for hosts without
# `make install`: build/dist/instar-VERSION-py3-none-PLATFORM.whl. Built from a copy of bindings/python so the
# source tree stays clean; uses the system's setuptools and wheel (no download). `wheel-only` packs whatever
# build/ holds (the tests use it with their own WHEEL_STAGE and WHEEL_DIR).
WHEEL_STAGE ?= $(OUT)/wheel-src
WHEEL_DIR   ?= $(OUT)/dist

wheel: build wheel-only

wheel-only:
	rm -rf $(WHEEL_STAGE) && mkdir -p $(WHEEL_STAGE) $(WHEEL_DIR)
	cp -r bindings/python/pyproject.toml bindings/python/setup.py bindings/python/README.md bindings/python/instar $(WHEEL_STAGE)/
	rm -rf $(WHEEL_STAGE)/instar/__pycache__ $(WHEEL_STAGE)/instar/_native && mkdir -p $(WHEEL_STAGE)/instar/_native
	cp $(OUT)/lib/libinstar.so $(WHEEL_STAGE)/instar/_native/libinstar.so
	$(PYTHON) -m pip wheel --no-deps --no-build-isolation --no-index --no-cache-dir -w $(WHEEL_DIR) $(WHEEL_STAGE)

# Perl binding (issue 12): the XS module in bindings/perl built against this tree's header and library (an rpath
# to build/lib, so no install is needed) and its prove suite.
APT_PKGS += libperl-dev perl libjson-xs-perl
.PHONY: perl-test perl-clean
perl-test: deps build
	cd bindings/perl && INSTAR_INC="-I$(CURDIR)/include" \
	  INSTAR_LIBS="-L$(CURDIR)/$(OUT)/lib -Wl,-rpath,$(CURDIR)/$(OUT)/lib" perl Makefile.PL && $(MAKE) && prove -b t/
test: perl-test
perl-clean:
	-[ -f bindings/perl/Makefile ] && $(MAKE) -C bindings/perl distclean >/dev/null
clean: perl-clean

# The differential tests of the drop-ins (test_compat_imageio.py, test_compat_oslo.py) run the original modules
# in the consumers' virtualenv: it is made before the differential suite, so they run rather than skip.
diff-test: $(CONSUMERS)/.ready-$(OVIRT_IMAGEIO)

# Fuzzing (fuzz/README.md): `make fuzz` runs every format's libFuzzer target for FUZZ_SECONDS (default 60);
# `make fuzz-smoke` builds the one sanitized binary and runs each target for FUZZ_SMOKE_SECONDS. A crash fails.
FUZZ_SMOKE_SECONDS ?= 5
.PHONY: fuzz-smoke
fuzz-smoke: deps
	FUZZ_SECONDS=$(FUZZ_SMOKE_SECONDS) FUZZ_OPT=-Onone FUZZ_KEEP_CORPUS=0 bash fuzz/run.sh

# nbdkit plugin (issue 15, docs/nbdkit.md): plugins/nbdkit/instar.c over the C API, built next to libinstar.so
# (found through an $ORIGIN rpath, or PREFIX/lib once installed). `make install` puts it in nbdkit's plugin
# directory so `nbdkit instar IMAGE` works (see NBDKIT_PLUGINDIR); `nbdkit-plugin-only` builds it from whatever
# build/ holds.
APT_PKGS += nbdkit nbdkit-plugin-dev libnbd-bin
# nbdkit looks for `nbdkit NAME` in its own plugin directory: a /usr or /usr/local install goes there, an install
# under another PREFIX stays inside it (PREFIX/lib/nbdkit/plugins).
ifneq ($(filter /usr /usr/local,$(PREFIX)),)
NBDKIT_PLUGINDIR ?= $(shell pkg-config --variable=plugindir nbdkit 2>/dev/null || echo $(PREFIX)/lib/nbdkit/plugins)
else
NBDKIT_PLUGINDIR ?= $(PREFIX)/lib/nbdkit/plugins
endif
.PHONY: nbdkit-plugin nbdkit-plugin-only install-nbdkit-plugin
all: nbdkit-plugin
diff-test: nbdkit-plugin
install-only: install-nbdkit-plugin
# `make install` builds the plugin before installing it (install-only alone installs it when build/ holds it).
ifneq ($(filter install,$(MAKECMDGOALS)),)
install-nbdkit-plugin: nbdkit-plugin
endif
nbdkit-plugin: build
	$(MAKE) --no-print-directory nbdkit-plugin-only
nbdkit-plugin-only:
	$(CC) -std=gnu11 -Wall -Wextra -Werror -O2 -fPIC -shared -Iinclude -o $(OUT)/lib/nbdkit-instar-plugin.so.new \
	  plugins/nbdkit/instar.c -L$(OUT)/lib -linstar -Wl,-rpath,'$$ORIGIN' -Wl,-rpath,$(PREFIX)/lib
	mv -f $(OUT)/lib/nbdkit-instar-plugin.so.new $(OUT)/lib/nbdkit-instar-plugin.so
install-nbdkit-plugin:
	@if [ -f $(OUT)/lib/nbdkit-instar-plugin.so ]; then \
	  install -d $(DESTDIR)$(NBDKIT_PLUGINDIR) && \
	  install -m 0755 $(OUT)/lib/nbdkit-instar-plugin.so $(DESTDIR)$(NBDKIT_PLUGINDIR)/nbdkit-instar-plugin.so; fi

# RBD suite (issue 15): the daemons of scripts/ceph-single-node.sh, which diff-test starts beside pytest. Where
# they cannot be installed, Tests/diff/test_rbd.py skips and says why.
CEPH_APT_PKGS := ceph-mon ceph-osd ceph-common uuid-runtime
.PHONY: ceph-deps
deps: ceph-deps
ceph-deps:
	@missing=""; for p in $(CEPH_APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	    || echo "warning: could not install$$missing: the RBD suite will be skipped"; \
	fi

# Concurrency under ThreadSanitizer (issue 14): Tests/concurrency/tsan.sh builds the engine and the C driver
# Tests/concurrency/stress.c with -sanitize=thread into build/tsan (once; again when a source is newer) and runs
# Tests/diff/test_concurrency.py against it; any ThreadSanitizer report fails. NOT part of `make test` (the build
# alone takes 5-6 minutes at -Onone, the run about 90 s); `make test` runs the same driver and test without TSan
# against build/lib/libinstar.so. STRESS_THREADS / STRESS_ITERS set the load (8 threads, 40 iterations), TSAN_OPT
# the swiftc optimisation (-Onone). Tests/concurrency/README.md.
.PHONY: tsan
tsan: deps build
	bash Tests/concurrency/tsan.sh

# NBD over TLS: Sources/CInstar/nbd_tls.c reads gnutls' header (the library itself is libnbd's, opened at run
# time); Tests/diff/test_nbd_tls.py makes its certificates and DH parameters with openssl.
APT_PKGS += libgnutls28-dev openssl

# Fuzz smoke in make test (issue 14): every format's libFuzzer target runs FUZZ_TEST_SECONDS (3 s; two targets at a
# time) at the end of make test, and a crash fails make test. The slow part, the sanitized build and the seeds
# (fuzz/run.sh with FUZZ_RUN=0), starts in the background before the release build under SCHED_IDLE (`chrt -i`;
# not nice, which the swift driver resets for its frontends), so it takes only the CPU the rest of make test leaves
# idle. fuzz-smoke-check waits for it (it holds prepare.lock until done), first raising it to normal priority if
# it is not done, then runs the targets. Everything lands in $(OUT)/fuzz. FUZZ_IN_TEST=0 leaves it out.
FUZZ_IN_TEST      ?= 1
FUZZ_TEST_SECONDS ?= 3
FUZZ_TEST_ENV     := FUZZ_DIR=$(CURDIR)/$(OUT)/fuzz FUZZ_OPT=-Onone FUZZ_KEEP_CORPUS=0
.PHONY: fuzz-smoke-prepare fuzz-smoke-check
ifeq ($(FUZZ_IN_TEST),1)
ifneq ($(filter test,$(MAKECMDGOALS)),)
build: fuzz-smoke-prepare
endif
test: fuzz-smoke-check
endif
# (setsid: the job leads its own session, whose processes fuzz-smoke-check can find; its pid is the session id.)
fuzz-smoke-prepare: deps
	@mkdir -p $(OUT)/fuzz && rm -f $(OUT)/fuzz/prepare.rc
	@exec 9>$(OUT)/fuzz/prepare.lock && flock 9 && \
	  setsid chrt -i 0 sh -c '$(FUZZ_TEST_ENV) FUZZ_RUN=0 bash fuzz/run.sh >$(OUT)/fuzz/prepare.log 2>&1; \
	    echo $$? >$(OUT)/fuzz/prepare.rc' </dev/null >/dev/null 2>&1 & echo $$! >$(OUT)/fuzz/prepare.pid
	@echo "fuzz: building the fuzz binary and the seeds in the background ($(OUT)/fuzz/prepare.log)"
fuzz-smoke-check: deps
	@mkdir -p $(OUT)/fuzz; \
	if ! flock -n $(OUT)/fuzz/prepare.lock true && [ -f $(OUT)/fuzz/prepare.pid ]; then \
	  echo "fuzz: the background build is not done; it runs at normal priority now"; \
	  for p in $$(pgrep -s "$$(cat $(OUT)/fuzz/prepare.pid)"); do chrt -o -p 0 $$p 2>/dev/null || true; done; \
	fi; \
	flock $(OUT)/fuzz/prepare.lock true
	@if [ -f $(OUT)/fuzz/prepare.rc ] && [ "$$(cat $(OUT)/fuzz/prepare.rc)" != 0 ]; then \
	  tail -20 $(OUT)/fuzz/prepare.log; echo "fuzz: the background build failed" >&2; exit 1; fi
	$(FUZZ_TEST_ENV) FUZZ_SECONDS=$(FUZZ_TEST_SECONDS) FUZZ_JOBS=2 bash fuzz/run.sh
