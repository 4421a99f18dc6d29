#!/usr/bin/env python3
"""Peak RSS and time of info, check, map, measure and convert -O raw on every hostile image the differential
tests build (issue 14), next to qemu-img's under `prlimit --as=1073741824 --cpu=30` (what VDSM wraps
`qemu-img info` of an untrusted image in).

The images come from the tests' own builders, imported, not copied:
  qcow2/vpc  Tests/diff/hostile_images.py VARIANTS (the qcow2 and vpc variants test_hostile.py runs)
  vmdk       test_vmdk_hostile.VARIANTS
  bochs      test_bochs.HOSTILE           cloop  test_cloop.HOSTILE
  dmg        test_dmg.HOSTILE + INSTAR_ONLY
  vdi        test_vdi.HOSTILE via variant()          parallels  test_parallels.HOSTILE via _hostile()
  qcow       test_qcow.HOSTILE via _hostile()        qed        test_qed.HOSTILE via _hostile()
  vhdx       test_vhdx._hostile_variants()           luks       test_luks_format._hostile_variants()
  qcow2-luks test_luks.CORRUPT_HEADERS
  fuzz       test_fuzz_findings.make_*() (the fuzzers' findings: VDI duplicate blocks, 64 GiB sparse qcow2,
             2 TiB vmdk without grain tables)

Each operation runs once per tool (or --runs times, keeping the run with the least CPU) as a direct child of
this script; its peak RSS is the child's ru_maxrss from wait4 (prlimit execs qemu-img in the same process), its
CPU time ru_utime + ru_stime, its wall time measured around the wait. A small C helper
(bench/hostile_budget_spawn.c, compiled into build/bench on first use) is the parent that forks and waits: a
child forked from this Python process would start with its (large) resident set as peak. instar runs plain
(its CLI has no untrusted-limits switch yet), with only a 120 s CPU guard so a runaway cannot stall the bench.

    python3 bench/hostile_budget.py [--instar build/bin/instar] [--only REGEX] [--ops info,check]
                                     [--jobs N] [--runs N] [--json [FILE]] [--flagged]
    python3 bench/hostile_budget.py --merge part1.json part2.json [--flagged]

Prints one line per image and operation, then the totals: max RSS and max time of each tool, how many runs
exceeded 64 MiB or 2 s (of CPU, and of wall time, which a loaded machine stretches), and the ratios
instar/qemu-img. Rows are flagged where instar is over 256 MiB or 2 s of CPU, or well over qemu-img's figures.
Not part of `make test`: the whole set takes about an hour of wall time on a loaded 2-core machine (mostly
qemu-img spinning to its 30 s CPU limit on backing loops and huge vmdk maps); split it with --only and --merge.
"""
import argparse
import concurrent.futures
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIFF = os.path.join(ROOT, "Tests", "diff")

MIB = 1 << 20
QEMU_PRLIMIT = ["prlimit", "--as=1073741824", "--cpu=30", "--"]
INSTAR_CPU_GUARD = 120
WALL_TIMEOUT = 300
SECRET = "secret,id=sec0,data=123456"
OPS = ["info", "check", "map", "measure", "convert"]
# Thresholds of the report: absolute budget and "much worse than qemu-img".
BUDGET_RSS = 64 * MIB
BUDGET_TIME = 2.0
HUGE_RSS = 256 * MIB


class Image:
    """A built hostile image: `src` is the argument list naming it to qemu-img/instar."""

    def __init__(self, group, name, src, cwd):
        self.group, self.name, self.src, self.cwd = group, name, src, cwd

    @property
    def key(self):
        return f"{self.group}/{self.name}"


def _plain(path):
    return [path]


def _luks(path):
    return ["--object", SECRET, "--image-opts", f"driver=luks,key-secret=sec0,file.filename={path}"]


def _qcow2_luks(path):
    return ["--object", SECRET, "--image-opts", f"driver=qcow2,encrypt.key-secret=sec0,file.filename={path}"]


def _write(path, data):
    with open(path, "wb") as f:
        f.write(bytes(data))
    return path


def case_builders(root):
    """(group, name, fn(dir) -> src args) for every hostile image, in a stable order."""
    import hostile_images as H
    import test_bochs
    import test_cloop
    import test_dmg
    import test_fuzz_findings
    import test_luks
    import test_luks_format
    import test_parallels
    import test_qcow
    import test_qed
    import test_vdi
    import test_vhdx
    import test_vmdk_hostile

    out = []
    ctx_lock = threading.Lock()
    ctx = {}

    def qcow2_ctx():
        with ctx_lock:
            if "c" not in ctx:
                ctx["c"] = H.Context(os.path.join(root, "_qcow2-bases"))
            return ctx["c"]

    for name in sorted(H.VARIANTS):
        group = "vpc" if name.startswith("vpc-") else "qcow2"
        out.append((group, name, lambda d, n=name: _plain(H.VARIANTS[n](qcow2_ctx(), d))))
    for name in sorted(test_vmdk_hostile.VARIANTS):
        out.append(("vmdk", name, lambda d, n=name: _plain(test_vmdk_hostile.VARIANTS[n](d))))
    for mod, fmt in ((test_bochs, "bochs"), (test_cloop, "cloop")):
        for name in sorted(mod.HOSTILE):
            out.append((fmt, name, lambda d, m=mod, n=name, f=fmt: _plain(
                _write(os.path.join(d, "h." + f), m.HOSTILE[n][0]()))))
    dmg = dict(test_dmg.HOSTILE)
    dmg.update(test_dmg.INSTAR_ONLY)
    for name in sorted(dmg):
        out.append(("dmg", name, lambda d, n=name: _plain(_write(os.path.join(d, "h.dmg"), dmg[n]()))))
    for mod, fmt, make in ((test_vdi, "vdi", test_vdi.variant), (test_parallels, "parallels", test_parallels._hostile),
                           (test_qcow, "qcow", test_qcow._hostile), (test_qed, "qed", test_qed._hostile)):
        for field, value in mod.HOSTILE:
            label = f"{field}={value!r}" if isinstance(value, bytes) else f"{field}={value:#x}"
            out.append((fmt, label, lambda d, mk=make, f=field, v=value: _plain(os.path.join(d, mk(d, f, v)))))

    base_dir = os.path.join(root, "_vhdx-base")
    os.makedirs(base_dir, exist_ok=True)
    vhdx = test_vhdx._hostile_variants(test_vhdx._base(base_dir))
    for name in sorted(vhdx):
        out.append(("vhdx", name, lambda d, n=name: _plain(_write(os.path.join(d, "h.vhdx"), vhdx[n]))))

    luks_dir = os.path.join(root, "_luks-base")
    os.makedirs(luks_dir, exist_ok=True)
    luks_src = os.path.join(luks_dir, "default.luks")
    test_luks_format.qemu_create(luks_src, "2M")
    luks = test_luks_format._hostile_variants(luks_src)
    for name in sorted(luks):
        out.append(("luks", name, lambda d, n=name: _luks(_write(os.path.join(d, "h.luks"), luks[n]))))

    def qcow2_luks(d, rel, data):
        p = os.path.join(d, "c.qcow2")
        test_luks.qemu_create(p)
        test_luks.corrupt(p, rel, data)
        return _qcow2_luks(p)

    for rel, data in test_luks.CORRUPT_HEADERS:
        out.append(("qcow2-luks", f"{rel}={data.hex()[:16]}", lambda d, r=rel, x=data: qcow2_luks(d, r, x)))

    out.append(("fuzz", "vdi-dup-blocks",
                lambda d: _plain(test_fuzz_findings.make_dup_vdi(os.path.join(d, "dup.vdi")))))
    out.append(("fuzz", "qcow2-sparse-64g",
                lambda d: _plain(test_fuzz_findings.make_sparse_qcow2(os.path.join(d, "sparse.qcow2")))))
    out.append(("fuzz", "vmdk-2t-no-tables",
                lambda d: _plain(test_fuzz_findings.make_vmdk_2t(os.path.join(d, "big.vmdk")))))
    return out


def op_args(op, src, out):
    if op == "info":
        return ["info", *src]
    if op == "check":
        return ["check", *src]
    if op == "map":
        return ["map", "--output=json", *src]
    if op == "measure":
        return ["measure", "-O", "qcow2", *src]
    return ["convert", "-O", "raw", *src, out]


def spawn_helper():
    """bench/hostile_budget_spawn.c, compiled into build/bench when missing or older than its source."""
    src = os.path.join(ROOT, "bench", "hostile_budget_spawn.c")
    exe = os.path.join(ROOT, "build", "bench", "hostile_budget_spawn")
    if not os.path.exists(exe) or os.path.getmtime(exe) < os.path.getmtime(src):
        os.makedirs(os.path.dirname(exe), exist_ok=True)
        subprocess.run(["cc", "-O2", "-o", exe + ".tmp", src], check=True)
        os.rename(exe + ".tmp", exe)
    return exe


SPAWN = None


def run_one(argv, cwd, guard=0):
    """Runs argv as the only child of the small spawn helper; returns its exit code (negative: killed by that
    signal), peak RSS (bytes), wall and CPU seconds, and the first line of its stderr."""
    out = os.path.join(cwd, "out.raw")
    so, se, res = (os.path.join(cwd, n) for n in (".stdout", ".stderr", ".result"))
    with open(so, "wb") as fo, open(se, "wb") as fe:
        subprocess.run([SPAWN, res, str(WALL_TIMEOUT), str(guard), *argv], cwd=cwd, stdin=subprocess.DEVNULL,
                       stdout=fo, stderr=fe, check=True)
    with open(res) as f:
        status, rss, wall, utime, stime = (int(x) for x in f.read().split())
    rc = os.waitstatus_to_exitcode(status)
    with open(se, "rb") as f:
        err = f.read(4096).decode("utf-8", "replace").strip().splitlines()
    for f in (so, se, res, out):
        if os.path.exists(f):
            os.unlink(f)
    return {"rc": rc, "rss": rss * 1024, "wall": wall / 1e9, "cpu": (utime + stime) / 1e6,
            "err": err[0][:200] if err else ""}


def best(runs):
    return min(runs, key=lambda r: r["cpu"])


def measure_image(img, ops, instar, runs):
    res = []
    out = os.path.join(img.cwd, "out.raw")
    for op in ops:
        args = op_args(op, img.src, out)
        q = best([run_one(QEMU_PRLIMIT + ["qemu-img", *args], img.cwd) for _ in range(runs)])
        i = best([run_one([instar, *args], img.cwd, INSTAR_CPU_GUARD) for _ in range(runs)])
        res.append({"image": img.key, "op": op, "qemu": q, "instar": i})
    return res


def flags(r):
    """Why a row deserves a look: instar over the absolute budgets, or much worse than qemu-img."""
    q, i = r["qemu"], r["instar"]
    f = []
    if i["rss"] > HUGE_RSS:
        f.append("rss>256M")
    if i["cpu"] > BUDGET_TIME:
        f.append("cpu>2s")
    if i["rss"] > 2 * q["rss"] + 16 * MIB:
        f.append("rss>>qemu")
    if i["cpu"] > 2 * q["cpu"] + 0.25:
        f.append("cpu>>qemu")
    return f


def summary(rows):
    def mx(tool, key):
        r = max(rows, key=lambda r: r[tool][key])
        return {"value": r[tool][key], "image": r["image"], "op": r["op"]}

    def ratio_stats(key, floor):
        rs = [max(r["instar"][key], floor) / max(r["qemu"][key], floor) for r in rows]
        return {"geomean": math.exp(sum(math.log(x) for x in rs) / len(rs)), "max": max(rs),
                "total": sum(r["instar"][key] for r in rows) / max(sum(r["qemu"][key] for r in rows), 1e-9)}

    s = {"runs": len(rows), "images": len({r["image"] for r in rows})}
    for tool in ("qemu", "instar"):
        s[tool] = {"max_rss": mx(tool, "rss"), "max_wall": mx(tool, "wall"), "max_cpu": mx(tool, "cpu"),
                   "total_wall": sum(r[tool]["wall"] for r in rows), "total_cpu": sum(r[tool]["cpu"] for r in rows),
                   "over_64MiB": sum(r[tool]["rss"] > BUDGET_RSS for r in rows),
                   "over_2s_cpu": sum(r[tool]["cpu"] > BUDGET_TIME for r in rows),
                   "over_2s_wall": sum(r[tool]["wall"] > BUDGET_TIME for r in rows),
                   "killed": sum(r[tool]["rc"] < 0 or r[tool]["rc"] >= 128 for r in rows)}
    s["ratio_instar_over_qemu"] = {"rss": ratio_stats("rss", 1), "cpu": ratio_stats("cpu", 0.005),
                                   "wall": ratio_stats("wall", 0.005)}
    s["flagged"] = [(r["image"], r["op"], flags(r)) for r in rows if flags(r)]
    return s


def fmt_row(r):
    q, i = r["qemu"], r["instar"]
    return (f"{r['image'][:58]:58} {r['op']:8} {q['rc']:>4} {q['rss'] / MIB:8.1f} {q['wall']:7.3f} {q['cpu']:7.3f}"
            f"  {i['rc']:>4} {i['rss'] / MIB:8.1f} {i['wall']:7.3f} {i['cpu']:7.3f}"
            f"  {i['rss'] / max(q['rss'], 1):5.2f} {max(i['cpu'], .005) / max(q['cpu'], .005):6.2f}"
            f"  {','.join(flags(r))}")


def print_table(rows, s, only_flagged):
    print(f"{'image':58} {'op':8} {'q.rc':>4} {'q.MiB':>8} {'q.wall':>7} {'q.cpu':>7}  {'i.rc':>4} {'i.MiB':>8}"
          f" {'i.wall':>7} {'i.cpu':>7}  {'rss/q':>5} {'cpu/q':>6}  flags")
    for r in rows:
        if not only_flagged or flags(r):
            print(fmt_row(r))
    print()
    print(f"{s['images']} images, {s['runs']} image+operation pairs")
    for tool, label in (("qemu", "qemu-img (prlimit --as=1GiB --cpu=30)"), ("instar", "instar")):
        t = s[tool]
        print(f"{label}:")
        print(f"  max RSS {t['max_rss']['value'] / MIB:.1f} MiB ({t['max_rss']['image']} {t['max_rss']['op']}),"
              f" max wall {t['max_wall']['value']:.3f} s ({t['max_wall']['image']} {t['max_wall']['op']}),"
              f" max CPU {t['max_cpu']['value']:.3f} s ({t['max_cpu']['image']} {t['max_cpu']['op']})")
        print(f"  total wall {t['total_wall']:.1f} s, total CPU {t['total_cpu']:.1f} s;"
              f" over 64 MiB: {t['over_64MiB']}, over 2 s of CPU: {t['over_2s_cpu']}"
              f" (of wall: {t['over_2s_wall']}), killed by a signal: {t['killed']}")
    for key, v in s["ratio_instar_over_qemu"].items():
        print(f"instar/qemu-img {key}: geometric mean {v['geomean']:.3f}, max {v['max']:.2f},"
              f" sum over sum {v['total']:.3f}")
    print(f"flagged (rss>256M, cpu>2s, rss>2x+16M or cpu>2x+0.25s of qemu-img): {len(s['flagged'])}")
    for image, op, f in s["flagged"]:
        print(f"  {image} {op}: {','.join(f)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instar", default=os.path.join(ROOT, "build", "bin", "instar"))
    ap.add_argument("--only", help="regex over group/name")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--jobs", type=int, default=1, help="images measured in parallel (timings get noisier)")
    ap.add_argument("--runs", type=int, default=1, help="runs per tool and operation; the least CPU is kept")
    ap.add_argument("--json", nargs="?", const="-", help="write the rows and totals as JSON (to FILE, or stdout)")
    ap.add_argument("--flagged", action="store_true", help="print only flagged rows in the table")
    ap.add_argument("--keep", help="build the images in this folder and keep them")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="print the table and totals of earlier --json "
                    "files together (runs split with --only; a later file's row for the same image and operation "
                    "wins), "
                    "measuring nothing")
    a = ap.parse_args()
    if a.merge:
        merged = {}
        for path in a.merge:  # a later file's row for the same image and operation replaces an earlier one
            with open(path) as f:
                for r in json.load(f)["rows"]:
                    merged[(r["image"], r["op"])] = r
        rows = list(merged.values())
        s = summary(rows)
        if a.json:
            doc = json.dumps({"rows": rows, "summary": s, "qemu_prlimit": QEMU_PRLIMIT[:-1]}, indent=1)
            with (sys.stdout if a.json == "-" else open(a.json, "w")) as f:
                f.write(doc)
            if a.json == "-":
                return
        print_table(rows, s, a.flagged)
        return
    global SPAWN
    SPAWN = spawn_helper()
    instar = os.path.abspath(a.instar)
    os.environ.setdefault("INSTAR_BUILD", os.path.dirname(os.path.dirname(instar)))
    sys.path.insert(0, DIFF)
    ops = [o for o in a.ops.split(",") if o]
    assert all(o in OPS for o in ops), ops
    root = os.path.abspath(a.keep) if a.keep else tempfile.mkdtemp(prefix="hostile-budget-")
    os.makedirs(root, exist_ok=True)
    try:
        builders = case_builders(root)
        if a.only:
            builders = [b for b in builders if re.search(a.only, f"{b[0]}/{b[1]}")]

        def one(b):
            group, name, make = b
            d = os.path.join(root, group, re.sub(r"[^A-Za-z0-9_.=-]", "_", name))
            os.makedirs(d, exist_ok=True)
            try:
                src = make(d)
            except Exception as e:  # a builder that fails is reported, not fatal
                print(f"# build failed: {group}/{name}: {e!r}", file=sys.stderr)
                return []
            rows = measure_image(Image(group, name, src, d), ops, instar, a.runs)
            if not a.keep:
                shutil.rmtree(d, ignore_errors=True)
            return rows

        rows = []
        with concurrent.futures.ThreadPoolExecutor(max(1, a.jobs)) as ex:
            for i, rs in enumerate(ex.map(one, builders)):
                rows += rs
                for r in rs:
                    if flags(r):
                        print(f"[{i + 1}/{len(builders)}] {fmt_row(r)}", file=sys.stderr, flush=True)
                if sys.stderr.isatty():
                    print(f"\r{i + 1}/{len(builders)}", end="", file=sys.stderr, flush=True)
                elif (i + 1) % 25 == 0:
                    print(f"[{i + 1}/{len(builders)}]", file=sys.stderr, flush=True)
        if sys.stderr.isatty():
            print(file=sys.stderr)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    s = summary(rows)
    if a.json:
        doc = json.dumps({"rows": rows, "summary": s, "qemu_prlimit": QEMU_PRLIMIT[:-1]}, indent=1)
        if a.json == "-":
            print(doc)
            return
        with open(a.json, "w") as f:
            f.write(doc)
    print_table(rows, s, a.flagged)


if __name__ == "__main__":
    main()
