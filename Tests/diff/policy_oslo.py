"""instar inspect's default policy (preset glance) against the real oslo.utils 10.2.0 format_inspector, on every
hostile image the differential tests build and on oslo.utils' own test images (issue 14).

Runs in the consumers' virtualenv (build/consumers/venv: oslo.utils from PyPI with its tests, pinned in
Tests/consumers/requirements.txt); instar through bindings/python. Used by bench/policy_vs_oslo.py (prints the
totals) and Tests/diff/test_policy_vs_oslo.py (make test).

The images:
  hostile   bench/hostile_budget.py's enumeration (866 images: every test_<format>.py's hostile variant list,
            hostile_images.py's qcow2/vpc variants, the fuzzers' findings), built by the tests' own builders
  inspect   test_inspect.py's hand-made images (polyglots, vmdk extents naming /etc/passwd, MBR/GPT tables...)
  oslo      oslo.utils' own test images (Tests/diff/oslo_own_images.py: test_format_inspector.py's builders)

Two verdicts per image, each compared with instar's under the same conditions:
  detect    what Glance's image import does: detect_file_format(path) (several formats matching is an
            ImageFormatError), then safety_check() of the detected inspector; instar.inspect(path)
  declared  the same with the format the image was made as given as the declared format, as Nova's
            do_image_deep_inspection and Glance's image_conversion do: refused when oslo.utils has no inspector of
            that name, when detection or the safety check fails, or when the detected format is another one (a
            GPT disk declared raw is accepted); instar.inspect(path, declared_format=...)
A verdict is (detected format, refused); "equal" means both parts equal. The detected format compares oslo.utils'
inspector NAME with instar's report.format, which uses oslo.utils' names (vhd, not qemu's vpc); several formats
compare as the sorted list. A format oslo.utils does not know (bochs, cloop, dmg, parallels, qcow v1) is raw to
both: instar inspect detects only the formats oslo.utils has an inspector for, so an image of such a format is raw
in both verdicts (and refused as not what was declared in the declared verdict, by both). The failing checks'
kinds are compared too (oslo.utils' check names against instar's fatal violation codes, KIND below) and counted
separately; a kind difference on an equal verdict is listed with its reason like a verdict difference.

EXPECTED lists the differences that are deliberate or where oslo.utils itself fails, each with its reason
(docs/inspect.md has the same table); any other difference is a finding.
"""
import os
import re
import shutil
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for p in (HERE, os.path.join(ROOT, "bench"), os.path.join(ROOT, "bindings", "python")):
    if p not in sys.path:
        sys.path.insert(0, p)

# instar's fatal violation codes as oslo.utils' safety-check names (format_inspector's SafetyCheck names, plus
# "multiple" for detect_file_format's "Multiple formats detected", "malformed" for an ImageFormatError out of
# safety_check, "declared" for a detected format other than the declared one).
KIND = {
    "multiple-formats": "multiple",
    "malformed": "malformed",
    "format-mismatch": "declared",
    "backing-file": "backing_file",
    "data-file": "data_file",
    "unknown-features": "unknown_features",
    "vmdk-descriptor": "descriptor",
    "vmdk-extent-path": "descriptor",
    "vmdk-footer": "footer",
    "partitions": "mbr",
    "banned-format": "banned",
}

# Glance's disk_format of an image made as each group's format (qemu's vpc is vhd; the formats Glance and oslo.utils
# do not know keep qemu's name, which neither accepts as a declared format).
DECLARED = {"vpc": "vhd", "qcow2-luks": "qcow2"}

# (regex over "group/name", verdict "detect"/"declared"/"any", what differs, reason). What differs: "verdict" (format
# or refusal), "kinds" (the failing checks only) or "oslo-crash" (oslo.utils raises something other than its own
# errors, so it gives no verdict).
EXPECTED = [
    (r"^(inspect/vmdk-parent|vmdk/desc-parent-hint-(self|unterminated))$", "any", "verdict",
     "deliberate: a vmdk descriptor's parentFileNameHint makes qemu open that file as a backing file (whatever "
     "parentCID says); oslo.utils' descriptor check takes it for a plain field and accepts; instar reports "
     "backing-file, fatal under every preset"),
    (r"^(qed/(features=0xffff|backing_offset=0xffffffff|backing_size=0x[0-9a-f]+)|inspect/qed-backing)$", "any",
     "kinds",
     "both refuse: oslo.utils bans qed outright (check `banned`) and reads nothing more of it; instar reports the "
     "backing file its header declares (feature bit 0) as well, which qemu would open"),
]


def declared_for(group, name):
    if group == "fuzz":
        return name.split("-")[0]
    return DECLARED.get(group, group)


# ---- the images --------------------------------------------------------------------------------------------

def _path_of(src):
    """The image file of hostile_budget's argument list (a path, or --image-opts ...file.filename=PATH)."""
    for a in src:
        m = re.search(r"file\.filename=([^,]+)", a)
        if m:
            return m.group(1)
    return src[-1]


def cases(root, full=True, only=None):
    """[(group, name, declared, fn(dir) -> path)] of every image, in a stable order. `full=False` drops the large
    sizes of oslo.utils' test_format (see oslo_own_images.builders)."""
    import hostile_budget
    import oslo_own_images
    out = []
    luks = iter(_qcow2_luks_builders(root))
    for group, name, make in hostile_budget.case_builders(root):
        if group == "qcow2-luks":   # the same corruption of a copy of one LUKS qcow2 (see _qcow2_luks_builders)
            make = next(luks)
        out.append((group, name, declared_for(group, name), lambda d, m=make: _path_of(m(d))))
    for name in _inspect_names():
        out.append(("inspect", name, _inspect_declared(name), lambda d, n=name: _inspect_image(d, n)))
    # hostile_budget made a plain LUKS image (its luks variants' source): oslo.utils' LUKS sizes are copies of it.
    base = os.path.join(root, "_luks-base", "default.luks")
    if os.path.exists(base):
        oslo_own_images.use_luks_base(base)
    for name, declared, make in oslo_own_images.builders(full=full):
        out.append(("oslo", name, declared, make))
    if only:
        out = [c for c in out if re.search(only, c[0] + "/" + c[1])]
    return out


def _qcow2_luks_builders(root):
    """hostile_budget's qcow2-luks images (test_luks.CORRUPT_HEADERS, in its order): each a corruption of the LUKS
    header inside a LUKS-encrypted qcow2 that qemu-img made. Each image here is a copy of test_inspect.py's
    (the inspect group's `qcow2-luks`, 8 MiB where test_luks makes 1 MiB ones), corrupted as test_luks.corrupt()
    does: the size, keys and salts differ from a fresh image's, and neither inspector reads them (qemu-img spends
    2-3 s of CPU on the PBKDF2 benchmark of every LUKS image it makes)."""
    import test_luks

    def make(d, rel, data):
        base = _inspect_image(d, "qcow2-luks")
        p = os.path.join(d, "c.qcow2")
        shutil.copyfile(base, p)
        test_luks.corrupt(p, rel, data)
        return [p]
    return [lambda d, r=rel, x=data: make(d, r, x) for rel, data in test_luks.CORRUPT_HEADERS]


def _inspect_names():
    import test_inspect
    return list(test_inspect.IMAGE_NAMES) + ["vmdk-parent", "qed-backing"]


def _inspect_declared(name):
    first = name.split("-")[0].split("+")[0]
    return {"vpc": "vhd", "mbr": "raw", "gpt": "raw", "fat": "raw", "empty": "raw", "text": "raw",
            "plain": "raw"}.get(first, first)


_INSPECT_CACHE = {}
_INSPECT_LOCK = threading.Lock()


def _inspect_image(d, name):
    """test_inspect.build_images makes all its images at once (they share bases): made once per root, copied."""
    import test_inspect
    root = os.path.dirname(os.path.dirname(d))
    with _INSPECT_LOCK:
        if root not in _INSPECT_CACHE:
            src = os.path.join(root, "_inspect-images")
            os.makedirs(src, exist_ok=True)
            _INSPECT_CACHE[root] = test_inspect.build_images(src)
        imgs = _INSPECT_CACHE[root]
    if name not in imgs:
        raise RuntimeError("test_inspect did not build %s (genisoimage failed?)" % name)
    return imgs[name]


# ---- the verdicts ------------------------------------------------------------------------------------------

class Verdict:
    def __init__(self, fmt, refused, kinds, crash=None):
        self.format, self.refused, self.kinds, self.crash = fmt, refused, sorted(kinds), crash

    def key(self):
        return (self.format, self.refused)

    def __repr__(self):
        if self.crash:
            return "crash(%s)" % self.crash
        return "%s %s%s" % (self.format, "refused" if self.refused else "accepted",
                            " [%s]" % ",".join(self.kinds) if self.kinds else "")


def oslo_verdict(fi, path, declared=None, detected=None):
    """oslo.utils' verdict; `detected` is oslo_detect()'s result for `path` when already known (the declared
    verdict only adds the format comparison to it)."""
    o = detected if detected is not None else oslo_detect(fi, path)
    if o.crash or declared is None or o.format is None or "multiple" in o.kinds:
        return o
    kinds = set(o.kinds)
    if fi.get_inspector(declared) is None or (o.format != declared and not (declared == "raw" and o.format == "gpt")):
        kinds.add("declared")
    return Verdict(o.format, bool(kinds), kinds)


def oslo_detect(fi, path):
    """detect_file_format(path), then safety_check() of what it detected."""
    try:
        det = fi.detect_file_format(path)
    except fi.ImageFormatError as e:
        text = str(e)
        head = "Multiple formats detected: "
        if text.startswith(head):
            return Verdict(",".join(sorted(text[len(head):].split(","))), True, ["multiple"])
        return Verdict(None, True, ["malformed"])
    except Exception as e:  # oslo.utils' own crash (no verdict)
        return Verdict(None, True, [], crash="%s: %s" % (type(e).__name__, e))
    kinds = set()
    try:
        det.safety_check()
    except fi.SafetyCheckFailed as e:
        kinds |= set(e.failures)
    except fi.ImageFormatError:
        kinds.add("malformed")
    except Exception as e:
        return Verdict(det.NAME, True, [], crash="%s: %s" % (type(e).__name__, e))
    return Verdict(det.NAME, bool(kinds), kinds)


def instar_verdict(path, declared=None):
    import instar
    r = instar.inspect(path, declared_format=declared)
    fmt = r.format if len(r.formats) < 2 else ",".join(sorted(r.formats))
    kinds = set()
    for v in r.violations:
        if not v.fatal:
            continue
        k = KIND.get(v.code)
        if v.code == "unsupported-version":
            k = "version" if v.field.startswith("luks") else "unknown_features"
        kinds.add(k or v.code)
    return Verdict(fmt, r.fatal, kinds), r


def expected(key, which, what):
    for pattern, verdict, kind, reason in EXPECTED:
        if re.search(pattern, key) and verdict in ("any", which) and kind == what:
            return reason
    return None


def compare_one(fi, group, name, declared, path):
    """Rows [(which, oslo Verdict, instar Verdict, status, reason)]; status is "equal", "kinds" (same verdict,
    other failing checks), "verdict" or "oslo-crash"."""
    key = group + "/" + name
    rows = []
    detected = oslo_detect(fi, path)
    for which, decl in (("detect", None), ("declared", declared)):
        o = oslo_verdict(fi, path, decl, detected)
        i, _ = instar_verdict(path, decl)
        if o.crash:
            status = "oslo-crash"
        elif o.key() != i.key():
            status = "verdict"
        elif o.kinds != i.kinds:
            status = "kinds"
        else:
            status = "equal"
        reason = expected(key, which, status) if status != "equal" else None
        rows.append((which, o, i, status, reason))
    return rows


def run(root, full=True, only=None, jobs=2, progress=None, keep=False):
    """Builds each image in its own folder under `root`, compares, removes it. Returns (rows, build failures):
    rows are dicts (image, declared, verdict, oslo, instar, status, reason)."""
    import logging
    from oslo_utils.imageutils import format_inspector as fi
    logging.disable(logging.CRITICAL)   # oslo.utils logs every failed check
    todo = cases(root, full=full, only=only)
    rows, failed = [], []

    def one(c):
        group, name, declared, make = c
        d = os.path.join(root, group, re.sub(r"[^A-Za-z0-9_.=-]", "_", name))
        os.makedirs(d, exist_ok=True)
        t0 = time.monotonic()
        try:
            path = make(d)
        except Exception as e:
            return c, None, "%s: %s" % (type(e).__name__, e)
        t1 = time.monotonic()
        try:
            res = compare_one(fi, group, name, declared, path)
            return c, (res, t1 - t0, time.monotonic() - t1), None
        finally:
            if not keep:
                shutil.rmtree(d, ignore_errors=True)

    import oslo_own_images
    try:
        done = _run_all(one, todo, jobs, progress)
    finally:
        oslo_own_images.cleanup()
    for c, res, err in done:
        group, name, declared, _ = c
        if res is None:
            failed.append((group + "/" + name, err))
        else:
            res, build_s, compare_s = res
            for which, o, i, status, reason in res:
                rows.append({"image": group + "/" + name, "declared": declared, "verdict": which,
                             "oslo": repr(o), "instar": repr(i), "status": status, "reason": reason,
                             "build_s": round(build_s, 3), "compare_s": round(compare_s, 3)})
    return rows, failed


def _run_all(one, todo, jobs, progress):
    import concurrent.futures
    out = []
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as ex:
        for n, r in enumerate(ex.map(one, todo)):
            out.append(r)
            if progress:
                progress(n + 1, len(todo))
    return out


def totals(rows, failed):
    images = sorted({r["image"] for r in rows})
    per_image = {}
    for r in rows:
        s = per_image.setdefault(r["image"], set())
        s.add("equal" if r["status"] == "equal" else ("explained" if r["reason"] else "unexplained"))
    t = {
        "images": len(images),
        "build_failures": len(failed),
        "verdicts": len(rows),
        "verdicts_equal": sum(1 for r in rows if r["status"] in ("equal", "kinds")),
        "kinds_equal": sum(1 for r in rows if r["status"] == "equal"),
        "differ_explained": sum(1 for r in rows if r["status"] != "equal" and r["reason"]),
        "differ_unexplained": sum(1 for r in rows if r["status"] != "equal" and not r["reason"]),
        "images_agreeing": sum(1 for s in per_image.values() if s == {"equal"}),
        "images_explained": sum(1 for s in per_image.values() if "explained" in s and "unexplained" not in s),
        "images_unexplained": sum(1 for s in per_image.values() if "unexplained" in s),
    }
    used = {reason for r in rows for reason in [r["reason"]] if reason}
    t["expected_unused"] = [e[0] for e in EXPECTED if e[3] not in used]
    return t
