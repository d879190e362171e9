# The make targets users of CRI image services expect. Everything is also a script under
# scripts/ (each with --help); `make help` lists the targets.
#   make / make build   release binary: target/release/lazypull
#   sudo make install   binary, /etc/lazypull/config.yaml, systemd unit, doc (scripts/install);
#                       PREFIX=/usr/local, DESTDIR= for staging. scripts/setup also configures
#                       containerd and starts both services.
#   make test           every test, as the README says (scripts/test; needs root)
#   make fmt            cargo fmt
#   make clean          cargo clean
PREFIX ?= /usr/local
DESTDIR ?=
CARGO ?= cargo
BIN := target/release/lazypull

.PHONY: all build install uninstall test fmt clean help
all: build

build:
	$(CARGO) build --release

# Builds first when cargo is on the PATH (sudo often drops ~/.cargo/bin from it: then the
# binary `make` built is installed).
install:
	@if command -v $(CARGO) >/dev/null 2>&1; then $(CARGO) build --release; \
	elif [ ! -x $(BIN) ]; then echo "make install: $(CARGO) is not on root's PATH and $(BIN) is not built: run 'make' first" >&2; exit 1; \
	else echo "make install: $(CARGO) is not on the PATH; installing the $(BIN) already built" >&2; fi
	scripts/install --binary $(BIN) --prefix $(PREFIX) $(if $(DESTDIR),--destdir $(DESTDIR)) >/dev/null
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; \
	echo "installed; start it with: systemctl enable --now lazypull (or scripts/setup, which also configures containerd)"; fi

# Removes what install installed, except the config and the store (/var/lib/lazypull).
uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/lazypull $(DESTDIR)/etc/systemd/system/lazypull.service
	rm -rf $(DESTDIR)$(PREFIX)/share/doc/lazypull

test:
	scripts/test

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean

help:
	@sed -n '3,9p' Makefile | sed 's/^# \{0,1\}//'
