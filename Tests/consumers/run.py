#!/usr/bin/env python3
"""Consumer suites: real callers' own tests, run once with qemu-img and once with instar as `qemu-img`.

Runs the test modules of ovirt-imageio (its sdist's `test/`) and oslo.utils (`oslo_utils/tests/imageutils`) that
call qemu-img, twice: with the real qemu-img first on PATH, then with instar first on PATH under the name
`qemu-img` (qemu-io, qemu-nbd and qemu-system stay the real ones). Both runs write junit-xml; every test that
passes with qemu-img must pass with instar, except the ones listed in expected_failures.txt with the issue they
wait on. A listed test that passes with instar fails the run too, so the list stays true.

The virtualenv and the unpacked sdist are made by `make consumer-test` (see README.md); this script only runs and
compares. Exit status: 0 when everything matches the list, 1 otherwise, 2 on a usage or setup error.
"""

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
EXPECTED = os.path.join(HERE, "expected_failures.txt")

# ovirt-imageio's modules that run qemu-img (found with --discover: a logging qemu-img over the whole suite).
OVIRT_MODULES = [
    "test/backends/nbd_test.py",
    "test/backup_test.py",
    "test/client_io_test.py",
    "test/client_test.py",
    "test/handlers/checksum_test.py",
    "test/nbd_test.py",
    "test/qemu_img_test.py",
    "test/qemu_nbd_test.py",
    "test/qmp_test.py",
]

# oslo.utils: its image tests (test_format_inspector.py runs qemu-img; the others are small and share helpers).
OSLO_MODULES = ["oslo_utils/tests/imageutils"]

# Drop-in runs (issue 11): the consumer's own tests of its qemu-img wrapper module, with that module swapped for
# instar's drop-in (instar_dropin.py) and the real qemu-img on PATH for whatever else the tests run. Suite
# `NAME+dropin` runs MODULES of suite NAME; each of its tests must pass where the same test passes in NAME's
# qemu-img run. Only run when instar's module (bindings/python/instar/compat/COMPAT) exists.
DROPIN = {
    "oslo.utils": ("oslo", ["oslo_utils/tests/imageutils/test_qemu.py",
                            "oslo_utils/tests/imageutils/test_format_inspector.py"]),
    "ovirt-imageio": ("imageio", ["test/qemu_img_test.py"]),
}
BINDINGS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "bindings", "python")

# ovirt-imageio's other modules reach qemu-img through that same module (client uploads and downloads, backups,
# checksums, NBD): the drop-in run takes every module the qemu-img run does.
DROPIN["ovirt-imageio"] = ("imageio", list(OVIRT_MODULES))

LINE = re.compile(r"^(?P<id>\S+)\s+#\s*issue\s+(?P<issue>\d+|\?)\s*:\s*(?P<reason>.*)$")


class SetupError(Exception):
    pass


def die(msg):
    print("consumers: " + msg, file=sys.stderr)
    sys.exit(2)


def suites(args):
    """name -> (cwd, pytest arguments, extra environment)."""
    site = subprocess.run(
        [args.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip()
    qemu_system = next((p for p in (shutil.which(n) for n in (
        "qemu-kvm", "qemu-system-" + os.uname().machine, "kvm")) if p), None)
    ovirt_env = {"PYTHONPATH": HERE}
    if qemu_system:
        ovirt_env["QEMU"] = qemu_system
    spec = {
        "ovirt-imageio": (
            args.ovirt_src,
            # tox.ini's addopts set a shared --basetemp and a 30 s per-test timeout: replaced by ours.
            ["-o", "addopts=", "-o", "timeout=900", "-p", "ovirt_adapt", "-m", "not benchmark"] + OVIRT_MODULES,
            ovirt_env),
        "oslo.utils": (site, ["--rootdir", site] + OSLO_MODULES, {}),
    }
    library = os.path.join(os.path.dirname(os.path.dirname(args.instar)), "lib", "libinstar.so")
    for name, (compat, modules) in DROPIN.items():
        base = os.path.join(BINDINGS, "instar", "compat", compat)
        if not (os.path.isdir(base) or os.path.exists(base + ".py")):
            continue
        cwd, pytest_args, env = spec[name]
        pytest_args = [a for a in pytest_args if a not in OVIRT_MODULES + OSLO_MODULES] + modules
        env = dict(env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, BINDINGS, env.get("PYTHONPATH")) if p)
        env["INSTAR_DROPIN"] = compat
        env["INSTAR_LIBRARY"] = library
        spec[name + "+dropin"] = (cwd, ["-p", "instar_dropin"] + pytest_args, env)
    return spec


def dropin_reference(ref, spec):
    """The qemu-img run's results of each drop-in run's modules, under the drop-in suite's test ids."""
    out = {}
    for name in spec:
        if not name.endswith("+dropin"):
            continue
        base = name[:-len("+dropin")]
        modules = DROPIN[base][1]
        for tid, result in ref.items():
            if tid.startswith(base + "::") and any(tid.startswith(base + "::" + m + "::") for m in modules):
                out[name + tid[len(base):]] = result
    return out


def run_suite(args, name, cwd, pytest_args, extra_env, tool, out, retry=False):
    """Runs one suite with `tool` as qemu-img; returns {test id: (outcome, message)} and seconds taken.
    retry: go through qemu_img_retry.py (the real qemu-img only: it retries qemu's CPU-clock race)."""
    bindir = os.path.join(out, "bin-" + name)
    os.makedirs(bindir, exist_ok=True)
    link = os.path.join(bindir, "qemu-img")
    if not os.path.lexists(link):
        if retry:
            with open(link, "w") as f:
                f.write('#!/bin/sh\nexec %s %s %s "$@"\n' % (
                    sys.executable, os.path.join(HERE, "qemu_img_retry.py"), tool))
            os.chmod(link, 0o755)
        else:
            os.symlink(tool, link)
    env = dict(os.environ)
    env.update(extra_env)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "/usr/bin:/bin")
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_XDIST_AUTO_NUM_WORKERS", None)
    # The tests' images and sockets go under a short path in /tmp: a UNIX socket's path is at most 107 bytes.
    scratch = tempfile.mkdtemp(prefix="instar-consumers-")
    env["TMPDIR"] = scratch
    xml = os.path.join(out, name + ".xml")
    log = os.path.join(out, name + ".log")
    cmd = [args.python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rN",
           "-o", "junit_family=xunit1", "--junitxml", xml, "--basetemp", os.path.join(scratch, "t")]
    if args.workers > 1:
        cmd += ["-n", str(args.workers)]
    cmd += pytest_args
    start = time.monotonic()
    with open(log, "w") as f:
        f.write("# cwd: %s\n# PATH: %s\n# %s\n" % (cwd, env["PATH"], " ".join(cmd)))
        f.flush()
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL).returncode
    took = time.monotonic() - start
    shutil.rmtree(scratch, ignore_errors=True)
    if rc not in (0, 1) or not os.path.exists(xml):
        raise SetupError("%s with %s: pytest exited %d without results; see %s" % (name, tool, rc, log))
    return parse_junit(xml, name), took


def parse_junit(path, suite):
    """{test id: (outcome, message)}; a test id is `suite::pytest node id`."""
    results = {}
    rank = {"passed": 0, "skipped": 1, "xfailed": 2, "failed": 3, "error": 4}
    for case in ET.parse(path).iter("testcase"):
        name = case.get("name")
        classname = case.get("classname") or ""
        path_ = case.get("file") or ""
        module = path_[:-3].replace("/", ".") if path_.endswith(".py") else ""
        if module and (classname == module or classname.startswith(module + ".")):
            parts = [path_] + [p for p in classname[len(module):].split(".") if p]
        else:
            parts = [classname]
        tid = suite + "::" + "::".join(parts + [name])
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                message = child.get("message") or ""
                if not message.strip() or "Incompatible Exception Representation" in message:
                    lines = [l for l in (child.text or "").splitlines() if l.strip()]
                    message = lines[-1] if lines else message
            elif child.tag == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
                message = child.get("message") or ""
        old = results.get(tid)
        if old is None or rank[outcome] > rank[old[0]]:
            results[tid] = (outcome, message.strip().splitlines()[0][:200] if message.strip() else "")
    return results


def read_expected(path):
    """{test id: (issue, reason)}, plus the file's leading comment block (kept by --update-expected)."""
    entries, header, errors = {}, [], []
    in_header = True
    with open(path) as f:
        for n, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                if in_header:
                    header.append(line)
                continue
            in_header = False
            m = LINE.match(line.strip())
            if not m:
                errors.append("%s:%d: not `test-id  # issue N: reason`: %s" % (path, n, line))
            elif m["id"] in entries:
                errors.append("%s:%d: listed twice: %s" % (path, n, m["id"]))
            else:
                entries[m["id"]] = (m["issue"], m["reason"])
    return entries, header, errors


def write_expected(path, header, entries):
    with open(path, "w") as f:
        for line in header:
            f.write(line + "\n")
        for tid in sorted(entries):
            issue, reason = entries[tid]
            f.write("%s  # issue %s: %s\n" % (tid, issue, reason))


def discover(args, spec, out):
    """Runs each whole suite with a qemu-img that logs the calling test; prints the modules that call it."""
    log = os.path.join(out, "calls.log")
    shim = os.path.join(out, "qemu-img-logging")
    real = shutil.which("qemu-img") or "/usr/bin/qemu-img"
    with open(shim, "w") as f:
        f.write('#!/bin/sh\nprintf "%%s\\n" "${PYTEST_CURRENT_TEST%%%%::*}" >> %s\nexec %s "$@"\n' % (log, real))
    os.chmod(shim, 0o755)
    whole = {"ovirt-imageio": ["test"], "oslo.utils": ["oslo_utils/tests"]}
    for name, (cwd, pytest_args, env) in spec.items():
        pytest_args = [a for a in pytest_args if a not in OVIRT_MODULES + OSLO_MODULES] + whole[name]
        try:
            run_suite(args, name, cwd, pytest_args, env, shim, os.path.join(out, "discover"))
        except SetupError as e:
            die(str(e))
    with open(log) as f:
        for module in sorted(set(line.strip() for line in f if line.strip())):
            print(module)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python", required=True, help="the virtualenv's python")
    p.add_argument("--ovirt-src", required=True, help="the unpacked ovirt-imageio sdist, extension built in place")
    p.add_argument("--instar", required=True)
    p.add_argument("--qemu-img", default=shutil.which("qemu-img") or "/usr/bin/qemu-img")
    p.add_argument("--workers", type=int, default=2, help="pytest-xdist workers per run (1: no xdist)")
    p.add_argument("--jobs", type=int, default=2, help="runs (suite x tool) at a time")
    p.add_argument("--out", help="folder for logs and junit-xml (default: a fresh temporary folder)")
    p.add_argument("--suite", action="append", help="run only this suite (repeatable)")
    p.add_argument("--update-expected", action="store_true",
                   help="rewrite expected_failures.txt: drop entries that pass with instar or name no test, add "
                        "new failures as `issue ?` (which fails the next run until someone names the issue)")
    p.add_argument("--discover", action="store_true", help="list the test modules that run qemu-img, and stop")
    args = p.parse_args()

    for path in (args.python, args.instar, args.qemu_img):
        if not os.access(path, os.X_OK):
            die("not executable: " + path)
    args.python = os.path.abspath(args.python)
    args.ovirt_src = os.path.abspath(args.ovirt_src)
    args.instar = os.path.abspath(args.instar)
    args.qemu_img = os.path.abspath(args.qemu_img)
    out = os.path.abspath(args.out) if args.out else tempfile.mkdtemp(prefix="instar-consumers-")
    if args.out:
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
    spec = suites(args)
    if args.suite:
        unknown = set(args.suite) - set(spec)
        if unknown:
            die("unknown suite: " + ", ".join(sorted(unknown)))
        spec = {k: v for k, v in spec.items() if k in args.suite or k.split("+")[0] in args.suite}
    if args.discover:
        return discover(args, spec, out)

    expected, header, errors = read_expected(EXPECTED)
    if errors and not args.update_expected:
        for e in errors:
            print("consumers: " + e)
        return 2

    total_start = time.monotonic()
    ref, ins = {}, {}
    # The reference runs first (they run more tests), --jobs runs at a time: the ovirt-imageio runs mostly wait on
    # qemu-nbd and sockets, the oslo.utils ones mostly compute, so two at once use the two cores better.
    # A drop-in run is instar's run of that suite: instar's module in-process, the real qemu-img on PATH.
    runs = [(name, "qemu-img", args.qemu_img, ref, True) for name in spec if "+" not in name]
    runs += [(name, "instar", args.instar, ins, False) for name in spec if "+" not in name]
    runs += [(name, "instar", args.qemu_img, ins, True) for name in spec if "+" in name]

    def one(run):
        name, label, tool, _, retry = run
        cwd, pytest_args, env = spec[name]
        return run_suite(args, name, cwd, pytest_args, env, tool, os.path.join(out, label), retry=retry)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(one, run): run for run in runs}
        for future in concurrent.futures.as_completed(futures):
            name, label, _, into, _ = futures[future]
            try:
                got, took = future.result()
            except SetupError as e:
                die(str(e))
            into.update(got)
            counts = {}
            for outcome, _ in got.values():
                counts[outcome] = counts.get(outcome, 0) + 1
            print("consumers: %-13s with %-8s %s (%.0f s)" % (
                name, label + ":", ", ".join("%d %s" % (counts[k], k) for k in sorted(counts)), took))
            sys.stdout.flush()

    ref.update(dropin_reference(ref, spec))
    ran = set(s + "::" for s in spec)
    in_scope = {t: v for t, v in expected.items() if any(t.startswith(s) for s in ran)}
    ref_pass = {t for t, (o, _) in ref.items() if o == "passed"}
    both = sorted(t for t in ref_pass if ins.get(t, ("missing",))[0] == "passed")
    waiting = sorted(t for t in ref_pass if t in in_scope and ins.get(t, ("missing",))[0] != "passed")
    regressions = sorted(t for t in ref_pass if t not in in_scope and ins.get(t, ("missing",))[0] != "passed")
    now_pass = sorted(t for t in in_scope if ins.get(t, ("missing",))[0] == "passed")
    unclassified = sorted(t for t in in_scope if in_scope[t][0] == "?" and t not in now_pass)
    stale = sorted(t for t in in_scope if t not in ref_pass and t not in now_pass)
    better = sorted(t for t, (o, _) in ins.items() if o == "passed" and t not in ref_pass and t not in in_scope)

    if args.update_expected:
        gone = [t for t in in_scope if t not in ref and t not in ins]
        for t in now_pass + gone:
            expected.pop(t, None)
        for t in regressions:
            outcome, message = ins.get(t, ("missing", ""))
            expected[t] = ("?", "%s with instar: %s" % (outcome, message))
        write_expected(EXPECTED, header, expected)
        print("consumers: rewrote %s: %d dropped (pass now), %d dropped (no such test), %d added as `issue ?` "
              "(name their issue)" % (EXPECTED, len(now_pass), len(gone), len(regressions)))
        stale = [t for t in stale if t not in gone]
        regressions = []
        now_pass = []

    for t in regressions:
        outcome, message = ins.get(t, ("missing", ""))
        print("REGRESSION: passes with qemu-img, %s with instar, not in expected_failures.txt: %s\n    %s" % (
            outcome, t, message))
    for t in now_pass:
        print("NOW PASSES: listed in expected_failures.txt (issue %s) but passes with instar; remove it: %s" % (
            expected[t][0], t))
    for t in unclassified:
        print("UNCLASSIFIED: expected_failures.txt lists it as `issue ?`; name the issue it waits on: %s" % t)
    for t in stale:
        print("note: listed in expected_failures.txt, did not pass with qemu-img in this run (%s): %s" % (
            ref.get(t, ("not run",))[0], t))
    for t in better:
        print("note: passes with instar, not with qemu-img (%s): %s" % (ref.get(t, ("not run",))[0], t))
    by_issue = {}
    for t in waiting:
        by_issue[expected[t][0]] = by_issue.get(expected[t][0], 0) + 1
    if by_issue:
        print("consumers: expected failures by issue: " + ", ".join(
            "#%s: %d" % (k, by_issue[k]) for k in sorted(by_issue, key=lambda k: (k == "?", k.zfill(4)))))
    print("consumers: logs and junit-xml in %s; %.0f s in all" % (out, time.monotonic() - total_start))
    failed = len(regressions) + len(now_pass) + len(unclassified)
    print("consumers: %d passed, %d failed, %d skipped" % (len(both), failed, len(waiting)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
