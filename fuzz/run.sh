#!/usr/bin/env bash
# Builds the libFuzzer binary once (every engine source with -sanitize=fuzzer,address) and runs one target per
# image format, each for a bounded time. A crash, a timeout or an out-of-memory fails the run (exit 1) and prints
# the file holding the input. See fuzz/README.md.
#   FUZZ_SECONDS  run time per target (default 60)     FUZZ_TARGETS  targets to run (default: all in the table)
#   FUZZ_DIR      work dir (default build/fuzz: binary, seeds/, corpus/, crashes/, logs/)
#   FUZZ_OPT      swiftc optimisation flag (default -O) FUZZ_SANITIZE sanitizers (default fuzzer,address)
#   FUZZ_TIMEOUT  seconds one input may take (default 120) FUZZ_BUILD  0 reuses the binary, 1 rebuilds it
#                                                         (default: rebuilt when a source is newer than it)
#   FUZZ_KEEP_CORPUS  0: start from the seeds alone and keep nothing (make fuzz-smoke); default 1 grows corpus/
#   FUZZ_RUN      0: build the binary and make the seeds, run nothing (make test does that in the background)
#   FUZZ_JOBS     targets run at a time (default 1)
# Extra arguments go to the fuzzer (with one target in FUZZ_TARGETS: a crash file, to reproduce it).
set -euo pipefail
# The whole script is one block, read before it runs: editing it while a long run goes on is harmless.
{
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${FUZZ_DIR:-$ROOT/build/fuzz}
SECONDS_TO_RUN=${FUZZ_SECONDS:-60}
OPT=${FUZZ_OPT:--O}
SANITIZE=${FUZZ_SANITIZE:-fuzzer,address}
TIMEOUT=${FUZZ_TIMEOUT:-120}
SWIFTC=${SWIFTC:-swiftc}
CLANG=${CLANG:-clang}
# The passphrase of the encrypted seeds; fuzz/FuzzImage.swift opens every input with it.
FUZZ_SECRET=instar-fuzz-secret

# ---- The targets -----------------------------------------------------------------------------------------------
# One line per target: the format name (what the fuzzer opens each input as; it also probes), then the shell
# commands that make its seeds. Adding a format is adding its line. The commands run in an empty scratch
# directory holding p.raw (1 MiB, two patterns) and small.raw and use these helpers, each leaving one seed named NAME:
#   seed FMT NAME SIZE 'CREATE-OPTIONS' ['qemu-io command' ...]   qemu-img create, then qemu-io writes
#   conv FMT NAME 'CONVERT-OPTIONS' [SOURCE]                      qemu-img convert of p.raw (or small.raw: 64 KiB)
#   keep NAME                                                     the file NAME a command before made
#   trim NAME                                                     drops NAME's trailing zero 4 KiB blocks (for
#                                                                 formats that read past the end as zeros), keeps it
# $SECRET is "--object secret,id=sec,data=<the fuzz passphrase>": name it key-secret=sec (encrypt.key-secret=sec).
# Keep seeds small (small cluster sizes, small virtual sizes) and LUKS iteration counts tiny (iter-time=1).
read -r -d '' TARGET_TABLE <<'EOF' || true
raw    seed raw empty 64k ''; seed raw data 256k '' 'write -P 0xaa 0 4k' 'write -P 0x55 100k 3k'
qcow2  seed qcow2 empty 1M '-o cluster_size=512'; seed qcow2 data 1M '-o cluster_size=512' 'write -P 0xaa 0 4k' 'write -z 8k 4k' 'write -P 0x55 600k 1k'; seed qcow2 v2 1M '-o compat=0.10,cluster_size=512' 'write -P 0xaa 0 4k'; seed qcow2 ext 1M '-o extended_l2=on,cluster_size=16k' 'write -P 0x11 0 2k' 'write -z 16k 4k'; seed qcow2 refs 1M '-o refcount_bits=1,cluster_size=1k' 'write -P 0x11 0 4k'; seed qcow2 lazy 1M '-o lazy_refcounts=on,cluster_size=4k' 'write -P 0x11 0 4k'; seed qcow2 backed 1M '-o cluster_size=512 -b p.raw -F raw' 'write -P 0x22 0 1k'; seed qcow2 snap 1M '-o cluster_size=512' 'write -P 0x11 0 1k' && qemu-img snapshot -c s1 snap && keep snap; seed qcow2 bitmaps 1M '-o cluster_size=512' 'write -P 0x11 0 1k' && qemu-img bitmap --add -g 512 bitmaps b0 && qemu-img bitmap --add --disable bitmaps b1 && qemu-io -f qcow2 -c 'write -P 0x22 64k 4k' bitmaps >/dev/null && keep bitmaps; conv qcow2 zlib '-c -o cluster_size=4k'; conv qcow2 zstd '-c -o cluster_size=4k,compression_type=zstd'; conv qcow2 luks "$SECRET -o cluster_size=4k,encrypt.format=luks,encrypt.key-secret=sec,encrypt.iter-time=1,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv" small.raw; seed qcow2 datafile 256k '-o cluster_size=512,data_file=datafile.bin' 'write -P 0x11 0 1k'
qed    seed qed empty 1M '-o cluster_size=4k'; seed qed data 1M '-o cluster_size=4k' 'write -P 0xaa 0 4k' 'write -z 8k 4k' 'write -P 0x55 600k 1k'; seed qed backed 1M '-o cluster_size=4k,backing_file=p.raw,backing_fmt=raw' 'write -P 0x22 4k 1k'
vdi    seed vdi empty 256k ''; seed vdi data 256k '' 'write -P 0xaa 0 4k'; seed vdi static 64k '-o static=on' 'write -P 0x55 0 1k'
vmdk   seed vmdk empty 1M ''; seed vmdk data 1M '' 'write -P 0xaa 0 4k'; seed vmdk zeroed 1M '-o zeroed_grain=on' 'write -P 0xaa 0 4k' 'write -z 64k 64k'; conv vmdk stream '-o subformat=streamOptimized'; seed vmdk scsi 1M '-o adapter_type=lsilogic,hwversion=6' 'write -P 0x11 0 512'
vpc    seed vpc empty 1M ''; seed vpc data 1M '' 'write -P 0xaa 0 4k'; seed vpc fixed 64k '-o subformat=fixed' 'write -P 0x55 0 1k'; seed vpc forced 1M '-o force_size=on' 'write -P 0x11 0 512'
vhdx   seed vhdx empty 1M '-o block_size=1M,log_size=1M' && trim empty; seed vhdx zero 3M '-o block_size=1M,log_size=1M' 'write -z 1M 1M' && trim zero; seed vhdx data 1M '-o block_size=1M,log_size=1M' 'write -P 0xaa 0 4k'
qcow   seed qcow empty 1M ''; seed qcow data 1M '' 'write -P 0xaa 0 4k' 'write -P 0x55 600k 1k'
parallels seed parallels empty 1M '-o cluster_size=4k'; seed parallels data 1M '-o cluster_size=4k' 'write -P 0xaa 0 4k' 'write -z 8k 4k'
bochs  built b2 'r.bochs_image(r.guest_pattern(65536))'; built b1 'r.bochs_image(r.guest_pattern(32768), extent=512, version=r.BOCHS_V1)'
cloop  built c1 'r.cloop_image(r.guest_pattern(1 << 17), block_size=16384)'; built c0 'r.cloop_image(bytes(4096), block_size=4096)'
dmg    built rsrc 'd.Image([("raw", b"a" * 1024), ("zero", 8), ("zlib", b"b" * 4096), ("bzip2", b"c" * 2048)]).layout()'; built xml 'd.Image([("zlib", bytes(range(256)) * 16), ("ignore", 4)]).layout("xml")'
luks   seed luks empty 64k "$SECRET -o key-secret=sec,iter-time=1,cipher-alg=aes-128"; conv luks data "$SECRET -o key-secret=sec,iter-time=1,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha1" small.raw
EOF
# --------------------------------------------------------------------------------------------------------------

mapfile -t ALL_TARGETS < <(awk 'NF { print $1 }' <<<"$TARGET_TABLE")
read -r -a TARGETS <<<"${FUZZ_TARGETS:-${ALL_TARGETS[*]}}"
for t in "${TARGETS[@]}"; do
  grep -qE "^$t[[:space:]]" <<<"$TARGET_TABLE" || { echo "fuzz: no target '$t' (targets: ${ALL_TARGETS[*]})" >&2; exit 2; }
done
mkdir -p "$WORK/obj" "$WORK/seeds" "$WORK/corpus" "$WORK/crashes" "$WORK/logs"
# One binary per optimisation and sanitizer set (make fuzz-smoke builds -Onone: a quarter of the compile time).
BIN=$WORK/instar-fuzz$OPT-${SANITIZE//,/-}

# ---- The build: once, for every target --------------------------------------------------------------------------
if [ "${FUZZ_BUILD:-}" = 1 ] || { [ "${FUZZ_BUILD:-}" != 0 ] && { [ ! -x "$BIN" ] ||
     [ -n "$(find Sources/Instar Sources/CInstar fuzz/FuzzImage.swift -newer "$BIN" -print -quit)" ]; }; }; then
  start=$(date +%s)
  # The C files the engine calls (shims, isolation, lazy library loading), compiled like SwiftPM does (plain C,
  # with the fuzzer's coverage).
  C_OBJECTS=()
  for c in Sources/CInstar/*.c; do
    o="$WORK/obj/$(basename "$c" .c).o"
    "$CLANG" -c -O1 -g -fsanitize=fuzzer-no-link -I Sources/CInstar/include "$c" -o "$o"
    C_OBJECTS+=("$o")
  done
  mapfile -t SOURCES < <(find "$ROOT/Sources/Instar" -name '*.swift' | sort)
  echo "fuzz: compiling ${#SOURCES[@]} engine sources + fuzz/FuzzImage.swift ($OPT, -sanitize=$SANITIZE)"
  # INSTAR_FUZZ: engine limits that only bound the fuzzer's work per input (LUKS PBKDF2 iteration counts).
  # Whole-module: one type check of the module instead of one per batch of files (less CPU on a busy machine).
  # Run in obj/, where the compiler leaves the module files -g makes.
  (cd "$WORK/obj" && "$SWIFTC" -sanitize="$SANITIZE" -parse-as-library $OPT -wmo -num-threads 2 -g \
    -module-name InstarFuzz -D INSTAR_FUZZ \
    -I "$ROOT/Sources/CInstar/include" -Xcc -fmodule-map-file="$ROOT/Sources/CInstar/include/module.modulemap" \
    "${SOURCES[@]}" "$ROOT/fuzz/FuzzImage.swift" "${C_OBJECTS[@]}" \
    -lz -lzstd -lgcrypt -lbz2 -o "$BIN.new")
  mv -f "$BIN.new" "$BIN"
  echo "fuzz: compiled in $(( $(date +%s) - start ))s"
fi

# ---- Seeds: made by qemu-img/qemu-io at run time (never committed) ------------------------------------------
S=$(mktemp -d)
trap 'rm -rf "$S"' EXIT
SECRET="--object secret,id=sec,data=$FUZZ_SECRET"
# qemu-img, retried while qemu cannot time PBKDF2 ("Unable to get accurate CPU usage") on a loaded machine.
qi() {
  local deadline=$(( $(date +%s) + 120 )) out
  while :; do
    if out=$(qemu-img "$@" 2>&1); then return 0; fi
    if [[ $out != *"Unable to get accurate CPU usage"* ]] || [ "$(date +%s)" -ge "$deadline" ]; then
      echo "$out" >&2; return 1
    fi
  done
}
seed() { # FMT NAME SIZE OPTIONS [qemu-io commands...]
  local fmt=$1 name=$2 size=$3 opts=$4; shift 4
  # shellcheck disable=SC2086  # the options are words on purpose
  qi create -q -f "$fmt" $opts "$name" "$size" || exit 1
  local args=(); for c in "$@"; do args+=(-c "$c"); done
  if [ ${#args[@]} -gt 0 ]; then
    # qemu-io may report a failed command on stdout and still exit 0.
    local out; out=$(qemu-io -f "$fmt" "${args[@]}" "$name" 2>&1) || { echo "$out" >&2; exit 1; }
    if grep -qiE "can't|error|fail|invalid|not supported" <<<"$out"; then echo "$out" >&2; exit 1; fi
  fi
  keep "$name"
}
conv() { # FMT NAME OPTIONS [SOURCE]
  # shellcheck disable=SC2086
  qi convert -O "$1" $3 "${4:-p.raw}" "$2" || exit 1
  keep "$2"
}
keep() { cp "$1" "$SEEDS/$1" || exit 1; }
built() { # NAME 'PYTHON EXPRESSION': a seed laid out byte by byte by Tests/diff's builders (r: readonly_images,
  # d: dmg_images), for the formats qemu-img cannot create
  python3 -c "import sys; sys.path.insert(0, '$ROOT/Tests/diff'); import readonly_images as r, dmg_images as d; \
open(sys.argv[1], 'wb').write($2)" "$1" >/dev/null && keep "$1"
}
trim() {
  local end; end=$(od -A d -v -w4096 -t x1 "$1" | awk '$2 != "" { for (i = 2; i <= NF; i++) if ($i != "00") { last = $1 } } END { print last + 4096 }')
  truncate -s "$end" "$1" && keep "$1"
}

for t in "${TARGETS[@]}"; do
  SEEDS=$WORK/seeds/$t
  mkdir -p "$WORK/corpus/$t"
  commands=$(awk -v t="$t" '$1 == t { sub(/^[^ \t]+[ \t]+/, ""); print }' <<<"$TARGET_TABLE")
  # Made again only when the target's line changed (the stamp holds the commands that made them).
  if [ -d "$SEEDS" ] && [ "$(cat "$SEEDS.made-by" 2>/dev/null)" = "$commands" ]; then continue; fi
  rm -rf "$SEEDS" "$SEEDS.made-by" && mkdir -p "$SEEDS"
  rm -rf "${S:?}"/* && qemu-img create -q -f raw "$S/p.raw" 1M && qemu-img create -q -f raw "$S/small.raw" 64k
  qemu-io -f raw -c "write -P 0x33 0 256k" -c "write -P 0x44 512k 64k" "$S/p.raw" >/dev/null
  qemu-io -f raw -c "write -P 0x66 0 8k" -c "write -P 0x77 32k 4k" "$S/small.raw" >/dev/null
  (cd "$S" && eval "$commands") || { echo "fuzz: making the $t seeds failed" >&2; rm -rf "$SEEDS"; exit 1; }
  printf '%s\n' "$commands" >"$SEEDS.made-by"
done

if [ "${FUZZ_RUN:-1}" = 0 ]; then echo "fuzz: binary $BIN and seeds ready"; exit 0; fi

# ---- The runs ---------------------------------------------------------------------------------------------------
# Each target's run leaves its summary line in $S/<target>.summary and its exit status in $S/<target>.rc.
run_target() {
  local t=$1 inputs rc=0 largest max_len log cov execs rate artifact
  shift
  # Inputs up to the largest seed (at least 256 KiB): some formats' smallest image is megabytes of metadata.
  largest=$(find "$WORK/seeds/$t" -type f -printf '%s\n' | sort -n | tail -1)
  max_len=$(( largest > 262144 ? largest : 262144 ))
  log=$WORK/logs/$t.log
  echo "fuzz: $t: $(ls "$WORK/seeds/$t" | wc -l) seeds, corpus $(ls "$WORK/corpus/$t" | wc -l) files, max_len $max_len, running ${SECONDS_TO_RUN}s"
  # Files among the extra arguments (a crash to reproduce) are run alone; otherwise the corpus, then the seeds.
  inputs=("corpus/$t" "seeds/$t")
  if [ "${FUZZ_KEEP_CORPUS:-1}" = 0 ]; then
    rm -rf "$S/corpus-$t" && mkdir "$S/corpus-$t" && inputs=("$S/corpus-$t" "seeds/$t")
  fi
  for a in "$@"; do [[ $a == -* ]] || inputs=(); done
  (cd "$WORK" && INSTAR_FUZZ_FORMAT=$t ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0} "$BIN" \
      -max_total_time="$SECONDS_TO_RUN" -max_len="$max_len" -timeout="$TIMEOUT" -rss_limit_mb=2048 \
      -artifact_prefix="$WORK/crashes/$t-" -print_final_stats=1 "$@" "${inputs[@]}" </dev/null) >"$log" 2>&1 || rc=$?
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)
  execs=$(awk '/stat::number_of_executed_units/ { print $2 }' "$log")
  rate=$(awk '/stat::average_exec_per_sec/ { print $2 }' "$log")
  printf '%-8s %-22s execs %-8s exec/s %-6s\n' "$t" "${cov:-cov: ?}" "${execs:-?}" "${rate:-?}" >"$S/$t.summary"
  if [ "$rc" -ne 0 ]; then
    artifact=$(grep -oE 'Test unit written to [^ ]+' "$log" | tail -1 | cut -d' ' -f5- || true)
    echo "fuzz: $t FAILED (exit $rc): ${artifact:-no input saved}; log $log" >&2
    grep -E '^(==[0-9]+==ERROR|SUMMARY|Fatal error|.*error: )' "$log" | head -5 >&2 || true
  fi
  echo "$rc" >"$S/$t.rc"
}
running=0
for t in "${TARGETS[@]}"; do
  if [ "$running" -ge "${FUZZ_JOBS:-1}" ]; then wait -n || true; running=$((running - 1)); fi
  run_target "$t" "$@" &
  running=$((running + 1))
done
wait
failed=()
summary=()
for t in "${TARGETS[@]}"; do
  summary+=("$(cat "$S/$t.summary" 2>/dev/null || echo "$t: no result")")
  [ "$(cat "$S/$t.rc" 2>/dev/null)" = 0 ] || failed+=("$t")
done
echo "fuzz: results (logs in $WORK/logs)"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED targets: ${failed[*]} (reproduce: FUZZ_TARGETS=<t> FUZZ_BUILD=0 bash fuzz/run.sh <crash file>)" >&2
  exit 1
fi
exit 0
}
