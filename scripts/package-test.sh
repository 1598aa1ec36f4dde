#!/usr/bin/env bash
# Build the Debian package, install it on this machine and check what it installed: the
# stripped binary runs and reports the crate's version, the unit passes systemd-analyze
# verify, the man pages, completions and plugins are where the system looks for them, and
# the directories have the owners and modes the unit expects. Needs root (dpkg -i).
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "package-test: $*" >&2; exit 1; }
deb=$(bash scripts/package.sh | tail -1)
[ -f "$deb" ] || fail "no package built"
size=$(stat -c %s "$deb")
echo "package: $deb ($((size / 1024 / 1024)) MiB)"
dpkg -i "$deb" >/dev/null
version=$(sed -n 's/^version = "\(.*\)"/\1/p' daemon/Cargo.toml | head -1)
[ "$(/usr/bin/veza-dr --version)" = "veza-dr $version" ] || fail "veza-dr --version: $(/usr/bin/veza-dr --version)"
# Stripped: no DWARF (.debug_gdb_scripts is a loaded section strip keeps), and far below the 200 MB of the release build's line tables.
if readelf -S /usr/bin/veza-dr | grep -qE '\.debug_(info|line|str)'; then fail "the installed binary has debug sections"; fi
installed=$(stat -c %s /usr/bin/veza-dr)
[ "$installed" -lt $((80 * 1024 * 1024)) ] || fail "the installed binary is $installed bytes"
systemd-analyze verify /lib/systemd/system/veza-dr.service || fail "systemd-analyze verify failed"
for f in /usr/share/man/man1/veza-dr.1.gz /usr/share/man/man1/veza-dr-status.1.gz \
    /usr/share/man/man1/veza-dr-restore.1.gz /usr/share/bash-completion/completions/veza-dr \
    /usr/share/zsh/vendor-completions/_veza-dr /usr/share/fish/vendor_completions.d/veza-dr.fish \
    /usr/lib/veza-dr/plugins/pg-promote.wasm /usr/share/doc/veza-dr/examples/policies/db.toml; do
    [ -s "$f" ] || fail "$f is missing"
done
[ ! -e /usr/lib/veza-dr/plugins/fixture.wasm ] || fail "the test-only fixture plugin is packaged"
zcat /usr/share/man/man1/veza-dr-check.1.gz | grep -q 'archiving' || fail "the check man page lacks its text"
[ "$(stat -c '%U %a' /etc/veza-dr/policies)" = "root 755" ] || fail "/etc/veza-dr/policies: $(stat -c '%U %a' /etc/veza-dr/policies)"
[ "$(stat -c '%U %a' /var/lib/veza-dr)" = "root 700" ] || fail "/var/lib/veza-dr: $(stat -c '%U %a' /var/lib/veza-dr)"
# The installed plugins are the ones the daemon finds by default through the unit.
VEZA_DR_PLUGINS=/usr/lib/veza-dr/plugins /usr/bin/veza-dr plugins | grep -q pg-promote || fail "veza-dr plugins does not list the packaged plugins"
echo "package-test: ok ($deb installed; $((installed / 1024 / 1024)) MiB binary)"
