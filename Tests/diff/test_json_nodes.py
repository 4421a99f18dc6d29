"""Block-node options as real callers pass them, next to qemu-img: a format over a raw window of a file (an OVA
member, as ovirt-imageio reads it), nested to any depth, in json: names and --image-opts; the "backing" option
(null, an explicit node, a node without a file of its own); file.locking; qemu's JSON dialect (single-quoted
strings, its error messages); file: names. Every case runs the same command through both programs."""
import filecmp
import json
import os
import subprocess
import time

import pytest
from conftest import assert_same, check_clean, convert_both, instar, qemu, qemu_io, qimg

import instar as pyinstar

OVA_HEAD = 4096


@pytest.fixture
def imgs(tmp):
    """base <- mid <- top (qcow2, data in every layer), d.qcow2, and ova: 4 KiB of header, d.qcow2, padding."""
    qimg("create", "-q", "-f", "qcow2", os.path.join(tmp, "base.qcow2"), "1M")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", os.path.join(tmp, "mid.qcow2"))
    qimg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", os.path.join(tmp, "top.qcow2"))
    qemu_io("-c", "write -P 1 0 64k", os.path.join(tmp, "base.qcow2"))
    qemu_io("-c", "write -P 2 64k 64k", os.path.join(tmp, "mid.qcow2"))
    qemu_io("-c", "write -P 3 128k 64k", os.path.join(tmp, "top.qcow2"))
    qimg("create", "-q", "-f", "qcow2", os.path.join(tmp, "d.qcow2"), "1M")
    qemu_io("-c", "write -P 7 0 64k", "-c", "write -P 8 512k 4k", os.path.join(tmp, "d.qcow2"))
    with open(os.path.join(tmp, "d.qcow2"), "rb") as f:
        disk = f.read()
    with open(os.path.join(tmp, "ova"), "wb") as f:
        f.write(b"\x55" * OVA_HEAD + disk + b"\0" * 3072)
    return tmp, len(disk)


def node(d):
    return "json:" + json.dumps(d)


def ova_window(size, offset=OVA_HEAD):
    return {"driver": "raw", "offset": offset, "size": size, "file": {"driver": "file", "filename": "ova"}}


def reads(tmp, name):
    """Commands that only read an image named `name`, for every subcommand."""
    return [["info", name], ["info", "--output=json", name], ["map", name], ["map", "--output=json", name],
            ["check", name], ["check", "--output=json", name], ["measure", "-O", "qcow2", name],
            ["measure", "--output=json", "-O", "raw", name]]


# 1. A format over a raw window

def test_qcow2_in_ova_member(imgs):
    tmp, size = imgs
    name = node({"driver": "qcow2", "file": ova_window(size)})
    for args in reads(tmp, name):
        assert_same(*args, cwd=tmp)
    assert assert_same("compare", name, "d.qcow2", cwd=tmp).rc == 0
    assert assert_same("compare", "-f", "qcow2", "-F", "qcow2", "d.qcow2", name, cwd=tmp).rc == 0
    for fmt in ("raw", "qcow2"):
        q, qd, idst = convert_both(tmp, ["-O", fmt], [name], fmt=fmt)
        assert q.rc == 0 and filecmp.cmp(qd, idst, shallow=False)


def test_window_in_image_opts(imgs):
    tmp, size = imgs
    for opts in (f"driver=qcow2,file.driver=raw,file.offset={OVA_HEAD},file.size={size},file.file.filename=ova",
                 f"driver=qcow2,file.driver=raw,file.offset=4k,file.size={size // 1024}k,file.file.driver=file,"
                 "file.file.filename=ova",
                 f"driver=qcow2,file.driver=raw,file.file.driver=raw,file.file.offset={OVA_HEAD},"
                 "file.file.file.filename=ova"):
        for args in (["info"], ["info", "--output=json"], ["map"], ["map", "--output=json"], ["check"]):
            assert_same(*args, "--image-opts", opts, cwd=tmp)
        assert_same("compare", "--image-opts", opts, "driver=qcow2,file.filename=d.qcow2", cwd=tmp)
        q, qd, idst = convert_both(tmp, ["--image-opts", "-O", "raw"], [opts], fmt="raw")
        assert q.rc == 0 and filecmp.cmp(qd, idst, shallow=False)
        assert_same("measure", "--image-opts", "-O", "qcow2", opts, cwd=tmp)


def test_windows_nested_and_under_raw(imgs):
    tmp, size = imgs
    inner = ova_window(size + 2048)
    for d in ({"driver": "qcow2", "file": {"driver": "raw", "file": ova_window(size)}},
              {"driver": "qcow2", "file": {"driver": "raw", "offset": 0, "size": size, "file": inner}},
              {"driver": "qcow2", "file": {"driver": "raw", "file": {"driver": "file", "filename": "d.qcow2"}}},
              {"driver": "raw", "file": ova_window(size)},
              {"driver": "raw", "offset": 512, "file": {"driver": "raw", "offset": OVA_HEAD,
                                                         "file": {"driver": "file", "filename": "ova"}}},
              {"driver": "raw", "file": {"driver": "raw", "file": {"driver": "file", "filename": "ova"}}}):
        for args in reads(tmp, node(d))[:5]:
            assert_same(*args, cwd=tmp)
        assert_same("compare", node(d), "d.qcow2", cwd=tmp)


@pytest.mark.parametrize("window,opts", [
    ({"offset": 0, "size": 2097152}, None),                      # the sum of offset and size past the file
    ({"offset": 1 << 30}, None),                                  # offset past the file
    ({"offset": 512, "size": 1000}, None),                        # size not a multiple of 512
    ({"offset": "x"}, None),
    ({"offset": -1}, None),
    ({"size": "1k"}, None),
    ({"offset": 0, "locking": "off"}, None),                      # locking belongs to the file node
    ({"bogus": 1}, None),
    (None, "driver=qcow2,file.driver=raw,file.offset=0"),         # a raw node without a file
    (None, "driver=qcow2,file.filename=d.qcow2,file.offset=0"),   # a file node has no offset
    (None, "driver=qcow2,file.filename=d.qcow2,file.bogus=1"),
    (None, "driver=qcow2,file.driver=raw,file.file.filename=d.qcow2,file.file.bogus=1"),
    (None, "driver=qcow2,file.driver=nosuch,file.file.filename=d.qcow2"),
    (None, "driver=qcow2,file.driver=raw,file.file.filename=ova,file.offset=x"),
])
def test_window_errors(imgs, window, opts):
    tmp, _ = imgs
    if window is not None:
        d = {"driver": "qcow2", "file": {"driver": "raw", **window, "file": {"driver": "file", "filename": "d.qcow2"}}}
        args = [node(d)]
    else:
        args = ["--image-opts", opts]
    for sub in (["info"], ["map"], ["check"], ["measure", "-O", "qcow2"]):
        assert_same(*sub, *args, cwd=tmp)
    assert_same("compare", *args, "driver=qcow2,file.filename=d.qcow2" if window is None else "d.qcow2",
                       cwd=tmp)


def test_window_error_message_as_issue(imgs):
    tmp, _ = imgs
    with open(os.path.join(tmp, "small"), "wb") as f:
        f.write(b"\0" * 1703936)
    d = {"driver": "raw", "file": {"driver": "raw", "offset": 0, "size": 2097152,
                                   "file": {"driver": "file", "filename": "small"}}}
    q = assert_same("info", node(d), cwd=tmp)
    assert "has to be smaller or equal to the  actual size of the containing file (1703936)" in q.err


# 2. The backing option

BACKING_NAMES = [
    {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": "top.qcow2"}},
    {"driver": "qcow2", "backing": {"driver": "qcow2", "backing": None,
                                    "file": {"driver": "file", "filename": "mid.qcow2"}},
     "file": {"driver": "file", "filename": "top.qcow2"}},
    {"driver": "qcow2", "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "base.qcow2"}},
     "file": {"driver": "file", "filename": "top.qcow2"}},
    {"driver": "qcow2", "backing": {"driver": "qcow2"}, "file": {"driver": "file", "filename": "top.qcow2"}},
    {"driver": "qcow2", "backing": {"driver": "qcow2", "backing": None},
     "file": {"driver": "file", "filename": "top.qcow2"}},
    {"driver": "qcow2", "backing": {"driver": "raw", "file": {"driver": "file", "filename": "d.qcow2"}},
     "file": {"driver": "file", "filename": "top.qcow2"}},
    {"driver": "qcow2", "backing": "nosuchnode", "file": {"driver": "file", "filename": "top.qcow2"}},
    {"driver": "qcow2", "backing": 3, "file": {"driver": "file", "filename": "top.qcow2"}},
    {"driver": "qcow2", "backing": {}, "file": {"driver": "file", "filename": "top.qcow2"}},
    {"driver": "qcow2", "backing": {"file": {"driver": "file", "filename": "nonexistent"}},
     "file": {"driver": "file", "filename": "top.qcow2"}},
]


@pytest.mark.parametrize("i", range(len(BACKING_NAMES)))
def test_backing_option(imgs, i):
    tmp, _ = imgs
    name = node(BACKING_NAMES[i])
    for args in reads(tmp, name) + [["info", "--backing-chain", name]]:
        assert_same(*args, cwd=tmp)
    for other in ("top.qcow2", "mid.qcow2", "base.qcow2"):
        assert_same("compare", name, other, cwd=tmp)
    q, qd, idst = convert_both(tmp, ["-O", "raw"], [name], fmt="raw")
    if q.rc == 0:
        assert filecmp.cmp(qd, idst, shallow=False)
    q, qd, idst = convert_both(tmp, ["-O", "qcow2"], [name])
    if q.rc == 0:
        assert filecmp.cmp(qd, idst, shallow=False)
        check_clean(idst)


@pytest.mark.parametrize("opts", [
    "driver=qcow2,file.filename=top.qcow2,backing.driver=qcow2,backing.file.filename=base.qcow2",
    "driver=qcow2,file.filename=top.qcow2,backing.file.filename=mid.qcow2,backing.backing.driver=qcow2,"
    "backing.backing.file.filename=d.qcow2",
    "driver=qcow2,file.filename=top.qcow2,backing=",
    "driver=qcow2,file.filename=top.qcow2,backing=null",
])
def test_backing_in_image_opts(imgs, opts):
    tmp, _ = imgs
    for sub in (["info"], ["map"], ["map", "--output=json"], ["check"], ["measure", "-O", "qcow2"]):
        assert_same(*sub, "--image-opts", opts, cwd=tmp)
    assert_same("compare", "--image-opts", opts, "driver=qcow2,file.filename=mid.qcow2", cwd=tmp)


def test_vdsm_measures_one_volume_and_a_subchain(imgs):
    tmp, _ = imgs
    volume = {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": "top.qcow2"}}
    subchain = {"driver": "qcow2", "file": {"driver": "file", "filename": "top.qcow2"},
                "backing": {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": "mid.qcow2"}}}
    sizes = []
    for d in (volume, subchain):
        q = assert_same("measure", "--output=json", "-O", "qcow2", node(d), cwd=tmp)
        assert q.rc == 0
        sizes.append(json.loads(q.out)["required"])
    whole = json.loads(assert_same("measure", "--output=json", "-O", "qcow2", "top.qcow2", cwd=tmp).out)["required"]
    assert sizes[0] < sizes[1] < whole


# 3. file.locking

@pytest.fixture
def holder(tmp):
    """Holds an image open for writing in qemu-nbd (qemu's write lock) until the test ends."""
    procs = []

    def start(path):
        sock = os.path.join(tmp, f"hold{len(procs)}.sock")
        p = subprocess.Popen(["qemu-nbd", "-k", sock, "-f", "qcow2", path], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        procs.append(p)
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            assert p.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.01)
        return p
    yield start
    for p in procs:
        p.terminate()
        p.wait()


def test_locking_off_reads_a_held_image(imgs, holder):
    tmp, _ = imgs
    holder(os.path.join(tmp, "d.qcow2"))
    plain = "driver=qcow2,file.filename=d.qcow2"
    for opts in (plain, plain + ",file.locking=on", plain + ",file.locking=auto"):
        q = assert_same("info", "--image-opts", opts, cwd=tmp)
        assert q.rc != 0 and "lock" in q.err
        assert assert_same("map", "--image-opts", opts, cwd=tmp).rc != 0
    off = plain + ",file.locking=off"
    for sub in (["info"], ["info", "--output=json"], ["map"], ["map", "--output=json"], ["check"],
                ["measure", "-O", "raw"]):
        assert assert_same(*sub, "--image-opts", off, cwd=tmp).rc == 0
    assert assert_same("compare", "--image-opts", off, "driver=qcow2,file.filename=top.qcow2", cwd=tmp).rc == 1
    q, qd, idst = convert_both(tmp, ["--image-opts", "-O", "raw"], [off], fmt="raw")
    assert q.rc == 0 and filecmp.cmp(qd, idst, shallow=False)
    name = node({"driver": "qcow2", "file": {"driver": "file", "filename": "d.qcow2", "locking": "off"}})
    for args in reads(tmp, name):
        assert_same(*args, cwd=tmp)
    assert assert_same("info", "--image-opts", plain + ",file.locking=bogus", cwd=tmp).rc == 1


def test_locking_off_takes_no_lock(imgs):
    tmp, _ = imgs
    path = os.path.join(tmp, "d.qcow2")
    name = node({"driver": "qcow2", "file": {"driver": "file", "filename": path, "locking": "off"}})
    with pyinstar.Image(name, flags=pyinstar.OPEN_READ_WRITE):
        # No lock taken: qemu-io may write alongside (with locking it would fail to get the write lock).
        r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read 0 512", path], capture_output=True, text=True)
        assert r.returncode == 0, r
    with pyinstar.Image(path, flags=pyinstar.OPEN_READ_WRITE):
        r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read 0 512", path], capture_output=True, text=True)
        assert r.returncode != 0 and "lock" in r.stderr, r


# 6. QEMU's JSON dialect

JSON_NAMES = [
    "json:{'driver':'qcow2','file':{'driver':'file','filename':'top.qcow2'}}",
    "json:{'driver':\"qcow2\",'file':{'driver':'file','filename':'to\\\"p.qcow2'}}",
    "json:{'driver':'qcow2','file':{'driver':'file','filename':'top.qcow2\\'x'}}",
    "json:{'driver':'qcow2','file':{'driver':'raw','offset':0,'file':{'driver':'file','filename':'top.qcow2'}}}",
    'json:{"driver":"qcow2","file":{"driver":"file","filename":"t\\u006fp.qcow2"}}',
    'json: {"driver": "qcow2", "file": {"driver": "file", "filename": "top.qcow2"}} ',
    "json:{'a", 'json:{"driver":"qcow2",}', "json:[1]", 'json:{"driver": 1e3}', 'json:{"a":01}', 'json:{"a":-}',
    'json: {"driver":"qcow2"} x', 'json:{"a":%d}', 'json:{"a":"\\x"}', 'json:{"a":tru}', "json:", "json:   ",
    'json:{"a":"\\u0000"}', 'json:{"a" "b"}', 'json:{"a":[1,]}', "json:{1:2}", 'json:{"a":1}}', 'json:{"a":1} {}',
    'json:{"a":Infinity}', 'json:{"a":1,"a":2}', 'json:{"a":"\\uD800"}', 'json:{"a":"\\uZZ"}', 'json:{"a":"\\u12"}',
    'json:{"a":1.5e}', 'json:{"a":1.}', 'json:{"a":"x', 'json:"x"', "json:1 2", 'json:{"a":[}', 'json:{"a":]}',
    'json:{"a" :: 1}', 'json:{"a":1 "b":2}', 'json:{"a": @}', 'json:}', 'json:]{', 'json:{"a":1}]',
    'json:{"driver":"qcow2","file":{}}', 'json:{"driver":"qcow2","file":{"driver":"raw","file":{}}}',
    'json:{"driver":"qcow2","file":{"driver":"raw","file":"x"}}', 'json:{"driver":"qcow2","filename":"top.qcow2"}',
    'json:{"driver":"qcow2","file":{"filename":"file:top.qcow2"}}',
    'json:{"a": null, "b": -0, "c": 1.5E+3, "d": [1, 2], "driver": "qcow2"}',
    "json:{'driver':'qcow2','file':{'driver':'file','filename':'top.qcow2'},'backing':null}",
]


# qemu's nesting limit (1024 open brackets and braces), balanced and not
JSON_NAMES += ["json:" + "[" * n + "]" * n for n in (1024, 1025)] + ["json:" + '{"a":' * n + "1" + "}" * n
                                                                     for n in (1024, 1025)]
JSON_NAMES += ["json:" + "[" * 3000, "json:" + "]" * 30 + "}"]


@pytest.mark.parametrize("name", JSON_NAMES)
def test_json_dialect(imgs, name):
    tmp, _ = imgs
    assert_same("info", name, cwd=tmp)
    assert_same("info", "--output=json", name, cwd=tmp)
    assert_same("map", name, cwd=tmp)


def test_single_quoted_name_everywhere(imgs):
    tmp, _ = imgs
    name = "json:{'driver':'qcow2','file':{'driver':'file','filename':'top.qcow2'}}"
    for args in reads(tmp, name) + [["info", "--backing-chain", name]]:
        assert_same(*args, cwd=tmp)
    assert assert_same("compare", name, "top.qcow2", cwd=tmp).rc == 0
    q, qd, idst = convert_both(tmp, ["-O", "raw"], [name], fmt="raw")
    assert q.rc == 0 and filecmp.cmp(qd, idst, shallow=False)


# 7. file: names

def test_file_prefix_names(imgs):
    tmp, _ = imgs
    qimg("create", "-q", "-f", "qcow2", "-b", "file:base.qcow2", "-F", "qcow2", "file:image:top.qcow2", cwd=tmp)
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "file:image:t2.qcow2", cwd=tmp)
    os.mkdir(os.path.join(tmp, "sub"))
    qimg("create", "-q", "-f", "qcow2", "-b", "file:base.qcow2", "-F", "qcow2", "sub/x.qcow2", cwd=tmp)
    for name in ("file:image:top.qcow2", "file:./image:top.qcow2", "file:image:t2.qcow2", "./image:t2.qcow2",
                 "image:t2.qcow2", "file:top.qcow2", "file:", "file:sub/x.qcow2", "sub/x.qcow2", "a:b.qcow2"):
        for args in reads(tmp, name) + [["info", "--backing-chain", name],
                                        ["info", "--backing-chain", "--output=json", name]]:
            assert_same(*args, cwd=tmp)
        assert_same("compare", name, "top.qcow2", cwd=tmp)
    q = assert_same("info", "file:image:t2.qcow2", cwd=tmp)
    assert "image: ./image:t2.qcow2" in q.out and "backing file: base.qcow2 (actual path: ./base.qcow2)" in q.out


def test_file_prefix_targets(imgs):
    tmp, _ = imgs
    res = {}
    for tool, runner in (("q", qemu), ("i", instar)):
        res[tool] = runner("create", "-f", "qcow2", "-b", "file:base.qcow2", "-F", "qcow2",
                           f"file:image:{tool}.qcow2", cwd=tmp)
    q, i = res["q"], res["i"]
    assert (i.rc, i.out.replace("image:i", "image:q"), i.err) == (q.rc, q.out, q.err)
    assert filecmp.cmp(os.path.join(tmp, "image:q.qcow2"), os.path.join(tmp, "image:i.qcow2"), shallow=False)
    assert_same("info", "file:image:i.qcow2", cwd=tmp)
    assert_same("create", "-f", "qcow2", "a:x.qcow2", "1M", cwd=tmp)
    for tool, runner in (("q", qemu), ("i", instar)):
        r = runner("convert", "-O", "qcow2", "top.qcow2", f"file:image:c{tool}.qcow2", cwd=tmp)
        assert r.rc == 0, r
    assert filecmp.cmp(os.path.join(tmp, "image:cq.qcow2"), os.path.join(tmp, "image:ci.qcow2"), shallow=False)


# The library takes json: names as any other name

def test_python_binding_ova_window_and_backing_null(imgs):
    tmp, size = imgs
    name = node({"driver": "qcow2", "file": {**ova_window(size), "file": {"driver": "file",
                                                                          "filename": os.path.join(tmp, "ova")}}})
    with pyinstar.Image(name) as img, pyinstar.Image(os.path.join(tmp, "d.qcow2")) as ref:
        assert img.size == ref.size
        for off in (0, 512 * 1024, 1 << 19):
            assert img.read(off, 65536) == ref.read(off, 65536)
    assert pyinstar.info_json(name) == qemu("info", "--output=json", name).out
    volume = node({"driver": "qcow2", "backing": None,
                   "file": {"driver": "file", "filename": os.path.join(tmp, "top.qcow2")}})
    q = json.loads(qemu("measure", "--output=json", "-O", "qcow2", volume).out)
    got = pyinstar.measure(volume, "qcow2")
    assert (got["required"], got["fully-allocated"]) == (q["required"], q["fully-allocated"])
    with pyinstar.Image(volume) as img:
        assert img.read(0, 4) == b"\0" * 4          # base's data is not read without the backing file
        assert img.read(128 * 1024, 4) == b"\3" * 4


def test_convert_into_a_window(imgs):
    """--target-image-opts with a raw window: the data lands inside the window of the containing file, and a
    qcow2 target that outgrows its window fails as qemu's does."""
    tmp, size = imgs
    results = {}
    for tool, runner in (("q", qemu), ("i", instar)):
        with open(os.path.join(tmp, f"big_{tool}"), "wb") as f:
            f.write(b"\xaa" * (3 << 20))
        with open(os.path.join(tmp, "ova"), "rb") as src:
            ova = src.read()
        with open(os.path.join(tmp, f"ova_{tool}"), "wb") as dst:
            dst.write(ova + b"\0" * (1 << 20))
        with open(os.path.join(tmp, f"tight_{tool}"), "wb") as dst:
            dst.write(ova)
        for target in (f"driver=raw,file.driver=raw,file.offset=1M,file.size=1M,file.file.filename=big_{tool}",
                       f"driver=qcow2,file.driver=raw,file.offset={OVA_HEAD},file.size={size + (1 << 20)},"
                       f"file.file.filename=ova_{tool}",
                       f"driver=qcow2,file.driver=raw,file.offset={OVA_HEAD},file.size={size},"
                       f"file.file.filename=tight_{tool}"):
            r = runner("convert", "-n", "--target-image-opts", "top.qcow2", target, cwd=tmp)
            results.setdefault(tool, []).append((r.rc, r.out, r.err.replace(f"_{tool}", "_X")))
    assert results["q"] == results["i"]
    assert results["q"][0][0] == 0 and results["q"][1][0] == 0
    for name in ("big", "ova"):
        assert filecmp.cmp(os.path.join(tmp, f"{name}_q"), os.path.join(tmp, f"{name}_i"), shallow=False)
    assert_same("convert", "-n", "--target-image-opts", "top.qcow2", "n.raw", cwd=tmp)
    assert_same("convert", "-n", "--target-image-opts", "top.qcow2", "driver=raw,file.driver=nosuch,file.filename=x",
                cwd=tmp)


def test_format_option_beside_a_json_name(imgs):
    """-f wins over the name's own driver (qemu joins the json: options under the ones it has)."""
    tmp, size = imgs
    for d in (BACKING_NAMES[0], {"driver": "qcow2", "file": ova_window(size)}):
        for fmt in ("raw", "qcow2"):
            for args in (["info", "-f", fmt], ["map", "-f", fmt], ["measure", "-f", fmt, "-O", "qcow2"],
                         ["check", "-f", fmt], ["compare", "-f", fmt, "-F", "qcow2"]):
                extra = ["d.qcow2"] if args[0] == "compare" else []
                assert_same(*args, node(d), *extra, cwd=tmp)


def test_backing_file_named_by_a_window(imgs):
    """An image whose backing file is stored as a json: name with a raw window (a member of an OVA)."""
    tmp, size = imgs
    window = ova_window(size)
    window["file"]["filename"] = os.path.join(tmp, "ova")
    backing = node({"driver": "qcow2", "file": window})
    qimg("create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", "over.qcow2", cwd=tmp)
    qemu_io("-c", "write -P 9 64k 4k", os.path.join(tmp, "over.qcow2"))
    for args in reads(tmp, "over.qcow2") + [["info", "--backing-chain", "over.qcow2"],
                                            ["info", "--backing-chain", "--output=json", "over.qcow2"]]:
        assert_same(*args, cwd=tmp)
    assert assert_same("compare", "over.qcow2", "d.qcow2", cwd=tmp).rc == 1
    q, qd, idst = convert_both(tmp, ["-O", "raw"], ["over.qcow2"], fmt="raw")
    assert q.rc == 0 and filecmp.cmp(qd, idst, shallow=False)
    # create takes no json: names, as qemu's
    assert_same("create", "-f", "qcow2", node({"driver": "file", "filename": "jc.qcow2"}), "1M", cwd=tmp)


def test_host_device_file_node(tmp):
    """The host_device protocol driver (what VDSM names for block storage) opens a device and refuses anything
    else after opening it, as file-posix does; its option errors name it."""
    qimg("create", "-q", "-f", "qcow2", os.path.join(tmp, "a.qcow2"), "1M")
    for fmt, filename in (("raw", "/dev/null"), ("qcow2", "a.qcow2"), ("raw", "missing"), (None, "/dev/null")):
        n = {"file": {"driver": "host_device", "filename": filename}}
        if fmt:
            n["driver"] = fmt
        for args in (["info", node(n)], ["info", "--output=json", node(n)], ["measure", "-O", "qcow2", node(n)]):
            assert_same(*args, cwd=tmp)
    assert_same("info", node({"driver": "raw", "file": {"driver": "host_device", "filename": "/dev/null",
                                                         "bogus": 1}}), cwd=tmp)
    assert_same("info", node({"driver": "raw", "file": {"driver": "host_device"}}), cwd=tmp)
