#!/usr/bin/env python3
"""instar vs qemu-img benchmarks. They only print; nothing here asserts.

  (a) info: instar_info_json as a library call from C and from Python (ctypes), and the instar CLI, against
      `qemu-img info --output=json` run as a subprocess plus json.loads (what a tool calling qemu-img pays).
  (b) convert -O raw of a 2 GiB qcow2 holding 1 GiB of random data (16 x 64 MiB extents, every other 64 MiB),
      qemu-img vs instar, median of 3 runs, output deleted and `sync` run before each run.
  (c) snapshot -c / -d on that image (bench/snapshot_bench.py), qemu-img vs instar, median of the runs.

Usage: bench/run.py [--build build] [--cache /tmp/instar-bench] [--info-calls N] [--runs 3] [--only info|convert|snapshot]
The 2 GiB input is made once in the cache dir and reused.
"""
import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from snapshot_bench import bench_snapshot  # noqa: E402
MIB = 1 << 20


def sh(*argv, **kw):
    subprocess.run(argv, check=True, **kw)


def timed(argv):
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def info_image(cache):
    """A 64 MiB qcow2 with a little data, for the info latency runs."""
    path = os.path.join(cache, "info.qcow2")
    if not os.path.exists(path):
        sh("qemu-img", "create", "-q", "-f", "qcow2", path + ".tmp", "64M")
        sh("qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 1M", "-c", "write -P 0x55 32M 1M", path + ".tmp",
           stdout=subprocess.DEVNULL)
        os.rename(path + ".tmp", path)
    return path


def bench_info(build, cache, calls):
    image = info_image(cache)
    lib = os.path.join(build, "lib", "libinstar.so")
    print(f"== info --output=json, {calls} calls each, on a 64 MiB qcow2 ==")
    results = {}

    # qemu-img as a subprocess, parsed the way a caller would.
    t0 = time.perf_counter()
    for _ in range(calls):
        out = subprocess.run(["qemu-img", "info", "--output=json", image], check=True, capture_output=True).stdout
        json.loads(out)
    results["qemu-img subprocess + json.loads"] = (time.perf_counter() - t0) / calls

    cli = os.path.join(build, "bin", "instar")
    t0 = time.perf_counter()
    for _ in range(calls):
        out = subprocess.run([cli, "info", "--output=json", image], check=True, capture_output=True).stdout
        json.loads(out)
    results["instar CLI subprocess + json.loads"] = (time.perf_counter() - t0) / calls

    # The C library from C: no process start, no parsing on the caller's side.
    exe = os.path.join(cache, "info_bench")
    cc = os.environ.get("CC", "cc")
    sh(cc, "-O2", "-I", os.path.join(ROOT, "include"), os.path.join(ROOT, "bench", "info_bench.c"),
       "-L", os.path.dirname(lib), "-linstar", "-Wl,-rpath," + os.path.dirname(os.path.abspath(lib)), "-o", exe)
    c_calls = calls * 10
    out = subprocess.run([exe, image, str(c_calls)], check=True, capture_output=True, text=True).stdout
    fields = dict(kv.split("=") for kv in out.split())
    results[f"libinstar from C ({c_calls} calls)"] = float(fields["per_call_us"]) / 1e6

    # The Python binding (ctypes), returning parsed JSON.
    os.environ["INSTAR_LIBRARY"] = os.path.abspath(lib)
    sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
    import instar
    if hasattr(instar, "info_json"):
        def call():
            return json.loads(instar.info_json(image))
    else:  # the binding predates info: call the C function through ctypes directly
        from instar._lib import Error, check, lib as load, take_string
        L = load()
        L.instar_info_json.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                       ctypes.POINTER(Error)]

        def call():
            p, err = ctypes.c_void_p(), Error()
            check(L.instar_info_json(image.encode(), None, ctypes.byref(p), ctypes.byref(err)), err)
            return json.loads(take_string(p.value))
    call()
    t0 = time.perf_counter()
    for _ in range(calls * 10):
        call()
    results[f"libinstar from Python ctypes ({calls * 10} calls)"] = (time.perf_counter() - t0) / (calls * 10)

    base = results["qemu-img subprocess + json.loads"]
    for name, t in results.items():
        print(f"  {name:48s} {t * 1e6:10.1f} us/call   qemu-img/this = {base / t:7.1f}x")


def big_image(cache):
    """2 GiB qcow2 with 16 x 64 MiB extents of random data at every other 64 MiB (reference section 8)."""
    path = os.path.join(cache, "big-2g-1g-random.qcow2")
    if os.path.exists(path):
        return path
    print(f"making {path} (once) ...", flush=True)
    raw = path + ".raw"
    with open(raw, "wb") as f:
        f.truncate(2048 * MIB)
        with open("/dev/urandom", "rb") as rnd:
            for i in range(16):
                f.seek(i * 128 * MIB)
                for _ in range(64):
                    f.write(rnd.read(MIB))
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path + ".tmp")
    os.unlink(raw)
    os.rename(path + ".tmp", path)
    return path


def bench_convert(build, cache, runs):
    src = big_image(cache)
    out = os.path.join(cache, "out.raw")
    tools = {"qemu-img": ["qemu-img"], "instar": [os.path.join(build, "bin", "instar")]}
    print(f"== convert -O raw, 2 GiB qcow2 with 1 GiB random data, median of {runs} ==")
    med = {}
    for name, argv in tools.items():
        times = []
        for _ in range(runs):
            if os.path.exists(out):
                os.unlink(out)
            sh("sync")
            times.append(timed([*argv, "convert", "-O", "raw", src, out]))
        if os.path.exists(out):
            os.unlink(out)
        med[name] = statistics.median(times)
        print(f"  {name:10s} median {med[name]:.3f} s  ({1024 / med[name]:.0f} MiB/s of data)  runs: "
              + " ".join(f"{t:.3f}" for t in times))
    print(f"  instar/qemu-img time ratio: {med['instar'] / med['qemu-img']:.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--cache", default="/tmp/instar-bench")
    ap.add_argument("--info-calls", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", choices=["info", "convert", "snapshot"])
    a = ap.parse_args()
    build = os.path.abspath(a.build)
    os.makedirs(a.cache, exist_ok=True)
    ok = True
    for name, fn in (("info", lambda: bench_info(build, a.cache, a.info_calls)),
                     ("convert", lambda: bench_convert(build, a.cache, a.runs)),
                     ("snapshot", lambda: bench_snapshot(build, a.cache, a.runs, big_image))):
        if a.only and a.only != name:
            continue
        try:
            fn()
        except (subprocess.CalledProcessError, OSError, AttributeError) as e:
            ok = False
            print(f"  {name} benchmark could not run: {e}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
