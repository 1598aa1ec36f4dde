#!/usr/bin/env bash
# Build the Debian package: the release binary (stripped by cargo-deb), the systemd unit, man
# pages and shell completions generated from the CLI definition, the plugins, example policies
# and docs. Prints the path of the .deb. Needs cargo-deb (scripts/setup.sh installs it) and the
# plugins built (plugins/build.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p veza-dr
bin=target/release/veza-dr
assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
"$bin" man "$assets/man"
gzip -9n "$assets"/man/*.1
"$bin" completions bash >"$assets/completions/veza-dr"
"$bin" completions zsh >"$assets/completions/_veza-dr"
"$bin" completions fish >"$assets/completions/veza-dr.fish"
cargo deb -p veza-dr --no-build --strip --quiet
ls -t target/debian/veza-dr_*.deb | head -1
