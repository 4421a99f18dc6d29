#!/usr/bin/env python3
"""instar inspect's default policy against the real oslo.utils format_inspector, on every hostile image of
Tests/diff and oslo.utils' own test images (issue 14; Tests/diff/policy_oslo.py says what is compared and how).

    python3 bench/policy_vs_oslo.py [--instar-build build] [--python build/consumers/venv/bin/python]
                                    [--quick] [--only REGEX] [--jobs N] [--all-rows] [--json [FILE]]

Needs the consumers' virtualenv (`make build/consumers/.ready-2.5.1`, made by `make consumer-test`): when this
interpreter cannot import oslo.utils' test module, the script runs itself again with --python. Prints every
verdict that differs (with its reason, or UNEXPLAINED), then the totals: images compared, verdicts equal, failing
checks equal, differences explained and unexplained. Exit status 1 when a difference is unexplained, an image could
not be built, or an entry of policy_oslo.EXPECTED matched nothing (the list must stay true).
--quick drops the 128/129 MiB sizes of oslo.utils' test_format images (what make test runs).
"""
import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIFF = os.path.join(ROOT, "Tests", "diff")


def have_oslo_tests():
    try:
        import oslo_utils.tests.imageutils.test_format_inspector  # noqa: F401
        return True
    except ImportError:
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instar-build", default=os.environ.get("INSTAR_BUILD", os.path.join(ROOT, "build")))
    ap.add_argument("--python", default=os.path.join(ROOT, "build", "consumers", "venv", "bin", "python"))
    ap.add_argument("--quick", action="store_true", help="oslo.utils' test_format at 7 MiB only")
    ap.add_argument("--only", help="regex over group/name")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--all-rows", action="store_true", help="print every verdict, not only the differences")
    ap.add_argument("--times", action="store_true", help="print the seconds spent building and comparing, per group")
    ap.add_argument("--json", nargs="?", const="-", help="write rows and totals as JSON (to FILE, or stdout)")
    a = ap.parse_args()
    build = os.path.abspath(a.instar_build)
    if not have_oslo_tests():
        if os.path.abspath(sys.executable) == os.path.abspath(a.python) or not os.path.exists(a.python):
            print("policy_vs_oslo: oslo.utils (with its tests) is not importable; make build/consumers/.ready-2.5.1",
                  file=sys.stderr)
            return 2
        os.execv(a.python, [a.python, os.path.abspath(__file__), *sys.argv[1:]])
    os.environ["INSTAR_BUILD"] = build
    os.environ["INSTAR_LIBRARY"] = os.path.join(build, "lib", "libinstar.so")
    sys.path.insert(0, DIFF)
    import policy_oslo

    start = time.monotonic()
    root = tempfile.mkdtemp(prefix="policy-oslo-")
    try:
        def progress(n, total):
            if sys.stderr.isatty():
                print("\r%d/%d" % (n, total), end="", file=sys.stderr, flush=True)
        rows, failed = policy_oslo.run(root, full=not a.quick, only=a.only, jobs=a.jobs, progress=progress)
        if sys.stderr.isatty():
            print(file=sys.stderr)
    finally:
        import shutil
        shutil.rmtree(root, ignore_errors=True)
    t = policy_oslo.totals(rows, failed)
    t["seconds"] = round(time.monotonic() - start, 1)
    if a.only:  # a partial run cannot tell which expected differences are stale
        t["expected_unused"] = []
    if a.json:
        doc = json.dumps({"rows": rows, "failed": failed, "totals": t}, indent=1)
        if a.json == "-":
            print(doc)
        else:
            with open(a.json, "w") as f:
                f.write(doc)
    if a.json != "-":
        for r in rows:
            if a.all_rows or r["status"] != "equal":
                tag = "equal" if r["status"] == "equal" else ("explained" if r["reason"] else "UNEXPLAINED")
                print("%-11s %-8s %-60s oslo: %-40s instar: %s" % (tag, r["verdict"], r["image"], r["oslo"],
                                                                   r["instar"]))
                if r["reason"] and r["status"] != "equal":
                    print("            reason: %s" % r["reason"])
        if a.times:
            per = {}
            for r in rows:
                if r["verdict"] == "detect":
                    g = per.setdefault(r["image"].split("/")[0], [0, 0.0, 0.0])
                    g[0] += 1
                    g[1] += r["build_s"]
                    g[2] += r["compare_s"]
            for g, (n, b, c) in sorted(per.items()):
                print("time %-12s %4d images, build %7.1f s, compare %6.1f s" % (g, n, b, c))
            import resource
            me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            print("cpu: this process %.1f s, its children (qemu-img, mkisofs...) %.1f s"
                  % (me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime))
        for key, err in failed:
            print("BUILD FAILED %s: %s" % (key, err))
        for pattern in t["expected_unused"]:
            print("STALE expected difference (matched nothing): %s" % pattern)
        print("images compared: %d (build failures: %d), verdicts: %d (detect + declared per image)"
              % (t["images"], t["build_failures"], t["verdicts"]))
        print("verdicts equal: %d, failing checks equal too: %d; differences explained: %d, unexplained: %d"
              % (t["verdicts_equal"], t["kinds_equal"], t["differ_explained"], t["differ_unexplained"]))
        print("images agreeing in both verdicts: %d, differing with a reason: %d, differing without: %d (%.0f s)"
              % (t["images_agreeing"], t["images_explained"], t["images_unexplained"], t["seconds"]))
    bad = t["differ_unexplained"] or t["build_failures"] or t["expected_unused"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
