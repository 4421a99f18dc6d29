#!/usr/bin/env bash
# Shows instar doing the main job next to qemu-img on a small image it makes itself.
# Usage: bench/demo.sh path/to/instar
set -euo pipefail
BIN=$(readlink -f "${1:-build/bin/instar}")
[ -x "$BIN" ] || { echo "demo: no instar binary at ${1:-build/bin/instar} (run make build)" >&2; exit 1; }
D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT
cd "$D"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
same() { # label, then a command line with "@" where the program goes: runs both, shows instar's, says if equal
  local label=$1; shift
  local q i
  q=$("${@/#@/qemu-img}" 2>&1 | sed 's/qemu-img/instar/g'; echo "rc=${PIPESTATUS[0]}")
  i=$("${@/#@/$BIN}" 2>&1; echo "rc=$?")
  step "$label: instar ${*:2}"
  printf '%s\n' "$i"
  if [ "$q" == "$i" ]; then echo "-> identical to qemu-img"; else echo "-> DIFFERS from qemu-img:"; printf '%s\n' "$q"; fi
}

step "making demo.qcow2 (64 MiB) with qemu-img and qemu-io, and a backing file"
qemu-img create -q -f qcow2 base.qcow2 64M
qemu-io -f qcow2 -c "write -P 0x11 0 4M" base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 demo.qcow2
qemu-io -f qcow2 -c "write -P 0xaa 1M 2M" -c "write -z 8M 1M" -c "write -P 0x55 32M 512k" demo.qcow2 >/dev/null
ls -l base.qcow2 demo.qcow2

same "info" @ info demo.qcow2
same "info --output=json" @ info --output=json demo.qcow2
same "map" @ map demo.qcow2
same "map --output=json" @ map --output=json demo.qcow2

step "convert -p -O raw demo.qcow2 instar.raw"
"$BIN" convert -p -O raw demo.qcow2 instar.raw
qemu-img convert -O raw demo.qcow2 qemu.raw
if cmp -s instar.raw qemu.raw; then echo "-> instar.raw is byte-identical to qemu-img's output"; else echo "-> instar.raw DIFFERS"; fi
same "compare with qemu-img's raw output" @ compare demo.qcow2 qemu.raw
qemu-io -f raw -c "write -P 0x77 40M 4k" qemu.raw >/dev/null
same "compare after changing 4 KiB of the copy" @ compare demo.qcow2 qemu.raw
echo
