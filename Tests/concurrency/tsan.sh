#!/usr/bin/env bash
# `make tsan`: the concurrency driver (Tests/concurrency/stress.c) under ThreadSanitizer.
# Builds ONE executable once: every engine source compiled by swiftc with -sanitize=thread (whole module, like
# fuzz/run.sh does with the fuzzer), the C shims of Sources/CInstar and stress.c compiled by the toolchain's clang
# with -fsanitize=thread. Rebuilt only when a source is newer than it. Then runs Tests/diff/test_concurrency.py
# with INSTAR_STRESS_EXE pointing at it: the same images, the same driver and the same checks as the quick run of
# `make test` (which builds stress.c without TSan against build/lib/libinstar.so), with more iterations. Any
# "WARNING: ThreadSanitizer" in the driver's output fails the test; TSAN_OPTIONS adds Tests/concurrency/tsan.supp.
#   TSAN_DIR   work dir (default build/tsan)        TSAN_OPT  swiftc optimisation flag (default -Onone)
#   TSAN_BUILD 1 rebuilds, 0 reuses the binary      STRESS_THREADS / STRESS_ITERS  the driver's load (8 / 40)
#   TSAN_BUILD_ONLY=1  builds and stops
set -euo pipefail
{
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=${TSAN_DIR:-$ROOT/build/tsan}
OPT=${TSAN_OPT:--Onone}
SWIFTC=${SWIFTC:-swiftc}
CLANG=${CLANG:-clang}
BIN=$WORK/stress-tsan$OPT
mkdir -p "$WORK/obj"

ENGINE=$WORK/obj/engine$OPT.o
# The engine (the slow part: several minutes on a busy machine): one object, rebuilt when an engine source changed.
if [ "${TSAN_BUILD:-}" = 1 ] || { [ "${TSAN_BUILD:-}" != 0 ] && { [ ! -f "$ENGINE" ] ||
     [ -n "$(find Sources/Instar Sources/CInstar -newer "$ENGINE" -print -quit)" ]; }; }; then
  start=$(date +%s)
  mapfile -t SOURCES < <(find "$ROOT/Sources/Instar" -name '*.swift' | sort)
  echo "tsan: compiling ${#SOURCES[@]} engine sources ($OPT, -sanitize=thread)"
  # Run in obj/, where the compiler leaves the module files -g makes.
  (cd "$WORK/obj" && "$SWIFTC" -sanitize=thread -parse-as-library $OPT -wmo -g -c -module-name Instar \
    -I "$ROOT/Sources/CInstar/include" -Xcc -fmodule-map-file="$ROOT/Sources/CInstar/include/module.modulemap" \
    "${SOURCES[@]}" -o "$ENGINE.new")
  mv -f "$ENGINE.new" "$ENGINE"
  echo "tsan: engine compiled in $(( $(date +%s) - start ))s"
fi
# The C shims and the driver, linked with the engine: seconds.
if [ "${TSAN_BUILD:-}" = 1 ] || [ ! -x "$BIN" ] || { [ "${TSAN_BUILD:-}" != 0 ] &&
   [ -n "$(find "$ENGINE" Sources/CInstar Tests/concurrency/stress.c include/instar.h -newer "$BIN" -print -quit)" ]; }; then
  objs=()
  for c in Sources/CInstar/*.c; do
    o=$WORK/obj/$(basename "$c" .c).o
    "$CLANG" -c -O1 -g -fPIC -fsanitize=thread -I Sources/CInstar/include "$c" -o "$o"
    objs+=("$o")
  done
  "$CLANG" -c -O1 -g -std=gnu11 -Wall -Wextra -Werror -fsanitize=thread -I include Tests/concurrency/stress.c \
    -o "$WORK/obj/stress.o"
  "$SWIFTC" -sanitize=thread "$ENGINE" "${objs[@]}" "$WORK/obj/stress.o" -lz -lzstd -lgcrypt -lbz2 -ldl -lpthread \
    -o "$BIN.new"
  mv -f "$BIN.new" "$BIN"
  echo "tsan: linked $BIN"
fi
[ "${TSAN_BUILD_ONLY:-0}" = 1 ] && exit 0

# The canary: a race on purpose must be reported, or this build would prove nothing.
if TSAN_OPTIONS= "$BIN" --race-canary >/dev/null 2>"$WORK/canary.log" ||
   ! grep -q "WARNING: ThreadSanitizer: data race" "$WORK/canary.log"; then
  echo "tsan: the race canary was not reported: is ThreadSanitizer active in $BIN?" >&2
  exit 1
fi
start=$(date +%s)
export INSTAR_STRESS_EXE=$BIN
export STRESS_THREADS=${STRESS_THREADS:-8} STRESS_ITERS=${STRESS_ITERS:-40}
export TSAN_OPTIONS="${TSAN_OPTIONS:-} suppressions=$ROOT/Tests/concurrency/tsan.supp second_deadlock_stack=1 history_size=4"
INSTAR_BUILD=${INSTAR_BUILD:-$ROOT/build} python3 -m pytest -q -p no:cacheprovider -s Tests/diff/test_concurrency.py
echo "tsan: run took $(( $(date +%s) - start ))s"
}
