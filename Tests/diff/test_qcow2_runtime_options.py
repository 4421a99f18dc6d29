"""qcow2's runtime options in --image-opts and json: names (qemu's qcow2_runtime_opts): instar refuses the values
and the names qemu-img refuses, with qemu-img's message and exit code, and accepts what it accepts. Before, instar
took any option on a qcow2 node without a word (a misspelt `l2-cache-sise` passed)."""
import json
import os

import pytest

from conftest import both, qimg

SECRET = ["--object", "secret,id=s0,data=abc"]

# Options on an unencrypted version 3 image: each alone, then pairs whose first failure qemu picks by its order
# (the option parser in its dictionary's order, then the cache sizes, the clean interval, lazy refcounts, the
# overlap checks, the encryption options; unknown names only after the backing chain is open).
PLAIN = [
    "nosuch=1", "lazy-refcounts=on", "lazy-refcounts=x", "lazy-refcounts=yes", "lazy-refcounts=1",
    "pass-discard-request=on", "pass-discard-snapshot=off", "pass-discard-other=2",
    "overlap-check=none", "overlap-check=constant", "overlap-check=x", "overlap-check=ALL",
    "overlap-check.template=on", "overlap-check.template=all", "overlap-check.main-header=off",
    "overlap-check.bitmap-directory=x", "overlap-check.nosuch=on", "overlap-check=all,overlap-check.template=none",
    "cache-size=1M", "cache-size=1.5M", "cache-size=abc", "cache-size=-1", "cache-size=16E", "cache-size=0",
    "cache-size=18446744073709551615", "l2-cache-size=64k", "l2-cache-size=1G", "refcount-cache-size=1G",
    "l2-cache-size=2M,cache-size=1M", "refcount-cache-size=2M,cache-size=1M",
    "l2-cache-size=1M,refcount-cache-size=1M,cache-size=2M", "l2-cache-entry-size=4096",
    "l2-cache-entry-size=100", "l2-cache-entry-size=131072", "l2-cache-entry-size=0", "l2-cache-entry-size=abc",
    "cache-clean-interval=10", "cache-clean-interval=0x10", "cache-clean-interval=x", "cache-clean-interval=1.5",
    "cache-clean-interval=-1", "cache-clean-interval=4294967295", "cache-clean-interval=4294967296",
    "discard-no-unref=on", "encrypt.format=luks", "encrypt.format=aes", "encrypt.nosuch=1", "encrypt.key-secret=s0",
    "lazy-refcounts=x,pass-discard-other=y", "overlap-check=x,lazy-refcounts=x", "cache-size=x,lazy-refcounts=x",
    "l2-cache-entry-size=100,overlap-check=x", "l2-cache-entry-size=100,l2-cache-size=2M,cache-size=1M",
    "nosuch=1,lazy-refcounts=x", "nosuch=1,overlap-check=x", "a=1,b=2,c=3", "zz=1,aa=2",
    "encrypt.format=luks,lazy-refcounts=x", "overlap-check=x,encrypt.format=luks",
]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("qcow2opts"))
    qimg("create", "-q", "-f", "qcow2", os.path.join(d, "v3.qcow2"), "1M")
    qimg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", os.path.join(d, "v2.qcow2"), "1M")
    qimg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", os.path.join(d, "lazy.qcow2"), "1M")
    # Big enough that an L2 cache of 512-byte entries can pass INT_MAX entries ("L2 cache size too big").
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", os.path.join(d, "big.qcow2"), "512P")
    qimg("create", "-q", "-f", "qcow2", *SECRET, "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
         os.path.join(d, "luks.qcow2"), "1M")
    qimg("create", "-q", "-f", "qcow2", os.path.join(d, "base.qcow2"), "1M")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", os.path.join(d, "top.qcow2"))
    qimg("create", "-q", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", os.path.join(d, "orphan.qcow2"),
         "1M")
    return d


def _same(d, *args):
    q, i = both(*args, cwd=d)
    assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err), (args, q, i)
    return q


@pytest.mark.parametrize("opts", PLAIN)
def test_info_on_a_plain_image(images, opts):
    _same(images, "info", *SECRET, "--image-opts", f"driver=qcow2,{opts},file.filename=v3.qcow2")


@pytest.mark.parametrize("image,opts", [
    ("v2.qcow2", "lazy-refcounts=on"), ("v2.qcow2", "lazy-refcounts=off"), ("v2.qcow2", "lazy-refcounts=on,nosuch=1"),
    ("lazy.qcow2", "lazy-refcounts=off"), ("lazy.qcow2", "overlap-check=x"),
    # (A cache qemu can really make but not allocate fails on its memory: "Could not allocate metadata caches",
    # which depends on the machine, so none of those here.)
    ("big.qcow2", "l2-cache-size=2T,l2-cache-entry-size=512"), ("big.qcow2", "cache-size=4T,l2-cache-entry-size=512"),
    ("luks.qcow2", "encrypt.nosuch=1"), ("luks.qcow2", "encrypt.format=aes"), ("luks.qcow2", "encrypt.format=luks"),
    ("luks.qcow2", "encrypt.format=qcow"), ("luks.qcow2", "encrypt.key-secret=s0,encrypt.nosuch=1"),
    ("luks.qcow2", "encrypt.key-secret=s0"), ("luks.qcow2", "encrypt.key-secret=s0,nosuch=1"),
    ("orphan.qcow2", "nosuch=1"), ("orphan.qcow2", "lazy-refcounts=x"),
])
def test_info_on_other_images(images, image, opts):
    _same(images, "info", *SECRET, "--image-opts", f"driver=qcow2,{opts},file.filename={image}")


def _json(**kw):
    node = {"driver": "qcow2", **kw}
    node.setdefault("file", {"driver": "file", "filename": "v3.qcow2"})
    return "json:" + json.dumps(node)


JSON_NAMES = [
    _json(**{"lazy-refcounts": True}), _json(**{"lazy-refcounts": 1}), _json(**{"cache-size": 1048576}),
    _json(**{"cache-size": 1.5}), _json(**{"cache-size": -5}), _json(**{"overlap-check": {"template": "all"}}),
    _json(**{"overlap-check": {"template": "x"}}), _json(nosuch=None), _json(**{"lazy-refcounts": None}),
    _json(**{"lazy-refcounts": [1]}), _json(**{"lazy-refcounts": []}),
    _json(nosuch=1, file={"driver": "file", "filename": "orphan.qcow2"}),
    _json(nosuch=1, backing={"driver": "qcow2", "nosuch2": 1, "file": {"driver": "file", "filename": "base.qcow2"}},
          file={"driver": "file", "filename": "top.qcow2"}),
    _json(backing={"driver": "qcow2", "nosuch2": 1, "file": {"driver": "file", "filename": "base.qcow2"}},
          file={"driver": "file", "filename": "top.qcow2"}),
    _json(**{"backing.lazy-refcounts": "x"}, file={"driver": "file", "filename": "top.qcow2"}),
]


@pytest.mark.parametrize("name", JSON_NAMES)
@pytest.mark.parametrize("cmd", [["info"], ["map", "--output=json"], ["compare"], ["convert", "-O", "raw"]])
def test_json_names_through_commands(images, name, cmd):
    args = [*cmd, name]
    if cmd[0] == "compare":
        args.append(name)
    if cmd[0] == "convert":
        out = os.path.join(images, "out.raw")
        q, i = both(*args, out, cwd=images)
        assert (i.rc, i.out, i.err) == (q.rc, q.out, q.err), (name, q, i)
        return
    _same(images, *args)


def test_library_refuses_an_unknown_option(images):
    """The Python binding opens through the same path: a misspelt option is an error there too."""
    import instar
    file = {"driver": "file", "filename": os.path.join(images, "v3.qcow2")}
    with pytest.raises(instar.Invalid) as e:
        instar.info_json(_json(**{"l2-cache-sise": "1M"}, file=file))
    assert "Block format 'qcow2' does not support the option 'l2-cache-sise'" in e.value.message
    with pytest.raises(instar.Invalid) as e:
        instar.info_json(_json(**{"overlap-check": "sometimes"}, file=file))
    assert "Unsupported value 'sometimes' for qcow2 option 'overlap-check'" in e.value.message
    assert json.loads(instar.info_json(_json(**{"l2-cache-size": "1M"}, file=file)))["format"] == "qcow2"


@pytest.mark.parametrize("fmt", ["vdi", "qed", "vhdx", "vmdk", "qcow"])
@pytest.mark.parametrize("opts", ["nosuch=1", "encrypt.key-secret=s0", "a=1,b=2,c=3", "log-replay=on"])
def test_formats_without_such_options(tmp, fmt, opts):
    """The other formats whose drivers have (almost) no options: an unknown name fails the open with qemu's message
    (qcow takes the encryption options, vmdk its extents' options)."""
    qimg("create", "-q", "-f", fmt, os.path.join(tmp, f"x.{fmt}"), "1M")
    _same(tmp, "info", *SECRET, "--image-opts", f"driver={fmt},{opts},file.filename=x.{fmt}")
