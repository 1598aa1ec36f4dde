#!/usr/bin/env bash
# Build every runbook-step plugin into a WebAssembly component: plugins/dist/<name>.wasm, and the
# test-only fixture (loops, hogs, traps on command) into plugins/test/fixture.wasm, outside what
# is shipped.
#
# Uses Debian's rustc-web/cargo-web (a Rust with a wasm32 std source) and builds std for
# wasm32-unknown-unknown; rustup's wasm-component-ld turns the core module into a component.
# With rustup's wasm32-unknown-unknown target the same line should work without -Zbuild-std (not
# tried here). Not wasm32-wasip2: its std imports WASI, which the plugin host refuses.
set -euo pipefail
cd "$(dirname "$0")"
RUSTC_WEB=${RUSTC_WEB:-/usr/bin/rustc}
CARGO_WEB=${CARGO_WEB:-/usr/bin/cargo}
LINKER=$(rustc --print sysroot)/lib/rustlib/x86_64-unknown-linux-gnu/bin/wasm-component-ld
WASM_LD=${WASM_LD:-/usr/lib/llvm-22/bin/wasm-ld}
for f in "$RUSTC_WEB" "$CARGO_WEB" "$LINKER" "$WASM_LD"; do
  [ -x "$f" ] || { echo "plugins/build.sh: $f is missing (run scripts/setup.sh)" >&2; exit 1; }
done
PLUGINS=(pg-promote http-check webhook-notify dns-switch fixture)
mkdir -p dist test
rm -f dist/fixture.wasm
for p in "${PLUGINS[@]}"; do
  RUSTC="$RUSTC_WEB" RUSTC_BOOTSTRAP=1 "$CARGO_WEB" rustc --quiet --release --locked -p "$p" \
    --target wasm32-unknown-unknown -Zbuild-std=std,panic_abort -- \
    -C linker="$LINKER" -C link-arg=--wasm-ld-path="$WASM_LD"
  out=dist
  [ "$p" = fixture ] && out=test
  cp "target/wasm32-unknown-unknown/release/${p//-/_}.wasm" "$out/$p.wasm"
done
ls -l dist/*.wasm test/*.wasm | awk '{print "plugins/build.sh: " $NF " " $5 " bytes"}' >&2
