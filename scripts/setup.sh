#!/usr/bin/env bash
# Install what the test suite needs on a bare Debian machine of this kind. Idempotent: a second
# run finds everything in place and returns in a second.
#
#   moto 5.2 (S3 server, PyPI) in a venv         -> $VEZA_CI_HOME/venv/bin/moto_server
#   Garage 2.5.0 (S3 server, crates.io)           -> ~/.cargo/bin/garage or $VEZA_CI_HOME/bin/garage
#                                                    (a cold build takes 15-40 min; kept across runs)
#   Debian packages: PostgreSQL 15 server and client tools, prometheus (promtool), chromium,
#                    the wasm32 Rust toolchain for plugins (rustc-web, cargo-web, rust-web-src,
#                    lld-22), PowerDNS with sqlite (pdns-server, pdns-backend-sqlite3), dig, sqlite3,
#                    ssh-keygen (openssh-client: the SSH-recipient test), strace (the fsync test),
#                    systemd-analyze (systemd) and readelf (binutils) for the package test
#   cargo-deb 3.8.0 (crates.io)                   -> ~/.cargo/bin/cargo-deb (builds the .deb)
set -euo pipefail
CI_HOME=${VEZA_CI_HOME:-/opt/veza-dr-ci}
log() { echo "setup: $*" >&2; }
mkdir -p "$CI_HOME/bin"

# Debian packages. Installed before any test cluster starts (an upgrade under a running server
# breaks it).
APT_PACKAGES=(postgresql-15 postgresql-client-15 util-linux prometheus chromium
  rustc-web cargo-web rust-web-src lld-22 pdns-server pdns-backend-sqlite3 bind9-dnsutils sqlite3
  openssh-client strace systemd binutils)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# moto in its own venv.
if ! "$CI_HOME/venv/bin/moto_server" --help >/dev/null 2>&1; then
  log "installing moto[s3] 5.2 into $CI_HOME/venv"
  python3 -m venv "$CI_HOME/venv"
  "$CI_HOME/venv/bin/pip" install -q --disable-pip-version-check 'moto[s3]==5.2.*' 'flask<4' 'flask-cors<7'
fi

# Garage 2.5.0: reuse an installed binary of that version, else build it once.
garage_ok() { [ -x "$1" ] && "$1" --version 2>/dev/null | grep -q '2\.5\.0'; }
GARAGE=""
for g in "${VEZA_GARAGE:-}" "$HOME/.cargo/bin/garage" "$CI_HOME/bin/garage" "$(command -v garage || true)"; do
  if [ -n "$g" ] && garage_ok "$g"; then GARAGE=$g; break; fi
done
if [ -z "$GARAGE" ]; then
  log "building garage 2.5.0 from crates.io (15-40 minutes, once per machine)"
  cargo install garage@2.5.0 --locked --root "$CI_HOME" --quiet
  GARAGE="$CI_HOME/bin/garage"
fi

# cargo-deb, to build the Debian package.
if ! cargo deb --version 2>/dev/null | grep -q '3\.8\.0'; then
  log "installing cargo-deb 3.8.0 from crates.io"
  cargo install cargo-deb@3.8.0 --locked --quiet
fi

cat > "$CI_HOME/env.sh" <<ENV
export VEZA_MOTO_SERVER="$CI_HOME/venv/bin/moto_server"
export VEZA_GARAGE="$GARAGE"
ENV
log "ready: moto $("$CI_HOME/venv/bin/pip" show moto 2>/dev/null | awk '/^Version/{print $2}'), $("$GARAGE" --version 2>/dev/null | head -1)"
