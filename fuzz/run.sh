#!/usr/bin/env bash
# Builds the libFuzzer target for the image open/read path and runs it for a bounded time.
#   FUZZ_SECONDS  run time (default 60)          FUZZ_OPT    swiftc optimisation flag (default -O)
#   FUZZ_DIR      work dir (default /tmp/instar-fuzz: binary, corpus/, crashes/)
#   FUZZ_SANITIZE sanitizers (default fuzzer,address)
# Extra arguments are passed to the fuzzer (for example a crash file to reproduce it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${FUZZ_DIR:-/tmp/instar-fuzz}
SECONDS_TO_RUN=${FUZZ_SECONDS:-60}
OPT=${FUZZ_OPT:--O}
SANITIZE=${FUZZ_SANITIZE:-fuzzer,address}
SWIFTC=${SWIFTC:-swiftc}
CLANG=${CLANG:-clang}
mkdir -p "$WORK/corpus" "$WORK/crashes" "$WORK/obj"

# The C shims the engine calls, compiled like SwiftPM does (plain C, with the fuzzer's coverage).
"$CLANG" -c -O1 -g -fsanitize=fuzzer-no-link -I Sources/CInstar/include Sources/CInstar/shims.c -o "$WORK/obj/shims.o"

# Optional entry points, compiled in only when the engine has them.
DEFINES=()
if grep -rqs '_cdecl("instar_info_json")' Sources/Instar; then DEFINES+=(-D INSTAR_FUZZ_INFO_JSON); fi

mapfile -t SOURCES < <(find Sources/Instar -name '*.swift' | sort)
echo "fuzz: compiling ${#SOURCES[@]} engine sources + fuzz/FuzzImage.swift ($OPT, -sanitize=$SANITIZE)"
"$SWIFTC" -sanitize="$SANITIZE" -parse-as-library $OPT -g -module-name InstarFuzz "${DEFINES[@]}" \
  -I Sources/CInstar/include -Xcc -fmodule-map-file="$ROOT/Sources/CInstar/include/module.modulemap" \
  "${SOURCES[@]}" fuzz/FuzzImage.swift "$WORK/obj/shims.o" \
  -lz -lzstd -lgcrypt -lbz2 -o "$WORK/instar-fuzz"

# Seeds: small valid images of several shapes, made fresh by qemu-img/qemu-io (never committed).
if [ -z "$(ls -A "$WORK/corpus")" ]; then
  S=$(mktemp -d)
  trap 'rm -rf "$S"' EXIT
  qemu-img create -q -f raw "$S/p.raw" 1M
  qemu-io -f raw -c "write -P 0x33 0 256k" -c "write -P 0x44 512k 64k" "$S/p.raw" >/dev/null
  mk() { # name, create options, qemu-io commands...
    local name=$1 opts=$2; shift 2
    qemu-img create -q -f qcow2 $opts "$S/$name.qcow2" 1M
    local args=(); for c in "$@"; do args+=(-c "$c"); done
    [ ${#args[@]} -gt 0 ] && qemu-io -f qcow2 "${args[@]}" "$S/$name.qcow2" >/dev/null
    # Small cluster sizes keep the seeds small; trim trailing zero clusters qemu never wrote.
    cp "$S/$name.qcow2" "$WORK/corpus/$name"
  }
  mk empty "-o cluster_size=512"
  mk data "-o cluster_size=512" "write -P 0xaa 0 4k" "write -z 8k 4k" "write -P 0x55 600k 1k"
  mk v2 "-o compat=0.10,cluster_size=512" "write -P 0xaa 0 4k"
  mk ext "-o extended_l2=on,cluster_size=16k" "write -P 0x11 0 2k" "write -z 16k 4k"
  mk refs "-o refcount_bits=1,cluster_size=1k" "write -P 0x11 0 4k"
  mk lazy "-o lazy_refcounts=on,cluster_size=4k" "write -P 0x11 0 4k"
  mk backed "-o cluster_size=512 -b p.raw -F raw" "write -P 0x22 0 1k"
  mk snap "-o cluster_size=512" "write -P 0x11 0 1k"
  qemu-img snapshot -c s1 "$S/snap.qcow2" && cp "$S/snap.qcow2" "$WORK/corpus/snap"
  mk bitmaps "-o cluster_size=512" "write -P 0x11 0 1k"
  qemu-img bitmap --add -g 512 "$S/bitmaps.qcow2" b0 && qemu-img bitmap --add --disable "$S/bitmaps.qcow2" b1
  qemu-io -f qcow2 -c "write -P 0x22 64k 4k" "$S/bitmaps.qcow2" >/dev/null && cp "$S/bitmaps.qcow2" "$WORK/corpus/bitmaps"
  qemu-img convert -c -O qcow2 -o cluster_size=4k "$S/p.raw" "$WORK/corpus/zlib"
  qemu-img convert -c -O qcow2 -o cluster_size=4k,compression_type=zstd "$S/p.raw" "$WORK/corpus/zstd"
fi
echo "fuzz: corpus $(ls "$WORK/corpus" | wc -l) files, running ${SECONDS_TO_RUN}s"
cd "$WORK"
exec ./instar-fuzz -max_total_time="$SECONDS_TO_RUN" -max_len=262144 -timeout=10 -rss_limit_mb=2048 \
  -artifact_prefix="$WORK/crashes/" -print_final_stats=1 "$@" corpus
