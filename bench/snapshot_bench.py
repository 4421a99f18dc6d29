"""snapshot -c / -d on a 2 GiB qcow2 holding 1 GiB of data (the convert input of run.py), qemu-img vs instar
in one run: each tool works on its own copy, creating then deleting snapshot "s", median of the runs."""
import os
import resource
import shutil
import statistics
import subprocess
import time


def _timed(argv):
    """Wall seconds and CPU seconds (user + system of the child) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def bench_snapshot(build, cache, runs, big_image):
    src = big_image(cache)
    tools = {"qemu-img": "qemu-img", "instar": os.path.join(build, "bin", "instar")}
    print(f"== snapshot -c then -d, 2 GiB qcow2 with 1 GiB data, median of {runs} ==")
    med = {}
    for name, exe in tools.items():
        work = os.path.join(cache, f"snap-{name}.qcow2")
        shutil.copyfile(src, work)
        subprocess.run(["sync"], check=True)
        creates, deletes = [], []
        for _ in range(runs):
            creates.append(_timed([exe, "snapshot", "-c", "s", work]))
            deletes.append(_timed([exe, "snapshot", "-d", "s", work]))
        os.unlink(work)
        med[name] = tuple(statistics.median(x[k] for x in runs_) for runs_ in (creates, deletes) for k in (0, 1))
        print(f"  {name:10s} create {med[name][0] * 1e3:8.1f} ms (cpu {med[name][1] * 1e3:6.1f} ms)   "
              f"delete {med[name][2] * 1e3:8.1f} ms (cpu {med[name][3] * 1e3:6.1f} ms)")
    for k, label in ((0, "create"), (2, "delete")):
        print(f"  {label}: instar/qemu-img time ratio {med['instar'][k] / med['qemu-img'][k]:.2f}, "
              f"cpu ratio {med['instar'][k + 1] / med['qemu-img'][k + 1]:.2f}")
