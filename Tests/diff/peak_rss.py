"""Peak resident memory of a command, for tests that bound it next to qemu-img's: the command runs as the only
child of a small C helper (bench/hostile_budget_spawn.c, shared with bench/hostile_budget.py) that reports its
wait4 rusage. A child forked straight from pytest would start with pytest's own resident set as its peak."""
import os
import subprocess
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SRC = os.path.join(ROOT, "bench", "hostile_budget_spawn.c")
_LOCK = threading.Lock()


def helper(build_dir):
    """The helper, compiled into `build_dir`/bench once (again when its source is newer)."""
    exe = os.path.join(build_dir, "bench", "hostile_budget_spawn")
    with _LOCK:
        if not os.path.exists(exe) or os.path.getmtime(exe) < os.path.getmtime(SRC):
            os.makedirs(os.path.dirname(exe), exist_ok=True)
            tmp = f"{exe}.{os.getpid()}"
            subprocess.run(["cc", "-O2", "-o", tmp, SRC], check=True)
            os.rename(tmp, exe)
    return exe


def run(build_dir, argv, cwd, timeout=600):
    """Runs argv; returns (exit code, stdout, stderr, peak RSS in bytes, CPU seconds)."""
    res = os.path.join(cwd, f".peak-rss-{os.getpid()}-{threading.get_ident()}")
    p = subprocess.run([helper(build_dir), res, str(timeout), "0", *argv], cwd=cwd, capture_output=True,
                       text=True, errors="replace")
    with open(res) as f:
        status, rss, _wall, utime, stime = (int(x) for x in f.read().split())
    os.unlink(res)
    return os.waitstatus_to_exitcode(status), p.stdout, p.stderr, rss * 1024, (utime + stime) / 1e6
