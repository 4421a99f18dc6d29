"""instar inspect's default policy gives oslo.utils' format_inspector verdict on every hostile image of Tests/diff
and on oslo.utils' own test images (issue 14's "Done when").

bench/policy_vs_oslo.py --quick runs in the consumers' virtualenv (the real oslo.utils 10.2.0 from PyPI, with its
test module, whose builders make oslo.utils' images): every image is built by its test's own builder, inspected by
both, and removed (Tests/diff/policy_oslo.py). Every difference must be one of policy_oslo.EXPECTED (each with its
reason; docs/inspect.md has the table), every EXPECTED entry must still match something, and every image must
build. --quick leaves out only the 128 and 129 MiB sizes of oslo.utils' test_format images (same headers as the
7 MiB ones it keeps); `python3 bench/policy_vs_oslo.py` runs them too.
"""
import json
import os
import subprocess

import pytest

from conftest import BUILD, ROOT

VENV_PYTHON = os.path.join(BUILD, "consumers", "venv", "bin", "python")
SCRIPT = os.path.join(ROOT, "bench", "policy_vs_oslo.py")


def test_default_policy_matches_oslo_on_every_hostile_and_oslo_image(tmp_path):
    if not os.path.exists(VENV_PYTHON):
        pytest.skip("oslo.utils' virtualenv is missing: run `make consumer-test` once")
    out = tmp_path / "r.json"
    env = dict(os.environ, INSTAR_BUILD=BUILD, TMPDIR=str(tmp_path))
    p = subprocess.run([VENV_PYTHON, SCRIPT, "--quick", "--jobs", "3", "--instar-build", BUILD, "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=1800)
    assert out.exists(), p.stderr[-4000:]
    doc = json.loads(out.read_text())
    t = doc["totals"]
    differ = [r for r in doc["rows"] if r["status"] != "equal" and not r["reason"]]
    assert differ == [], "\n".join("%s %s: oslo %s, instar %s" % (r["verdict"], r["image"], r["oslo"], r["instar"])
                                   for r in differ)
    assert doc["failed"] == []
    assert t["expected_unused"] == []
    # hostile_budget.py's 866, test_inspect.py's 51, oslo.utils' 68 at --quick.
    assert t["images"] >= 866 + 51 + 68, t
    assert t["verdicts"] == 2 * t["images"]
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
