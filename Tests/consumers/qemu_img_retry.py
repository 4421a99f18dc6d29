"""The reference run's `qemu-img`: runs the real one, retrying qemu's "Unable to get accurate CPU usage".

qemu's PBKDF2 benchmark (LUKS creation) reads thread CPU time in milliseconds and fails with that message when a
run reads as 0 ms, which happens now and then on a busy machine; the callers' tests then skip or fail with the real
qemu-img only, by chance. This retries that one failure until a deadline (not a count), and otherwise passes
output and exit code through unchanged. Usage: python3 qemu_img_retry.py REAL_QEMU_IMG ARGS...
(run.py writes a small `qemu-img` script that calls this.)
"""

import subprocess
import sys
import time

QEMU_CPU_RACE = b"Unable to get accurate CPU usage"
RETRY_SECONDS = 900


def main():
    argv = sys.argv[1:]
    deadline = time.monotonic() + RETRY_SECONDS
    while True:
        p = subprocess.run(argv, capture_output=True)
        if p.returncode == 0 or QEMU_CPU_RACE not in p.stderr or time.monotonic() > deadline:
            break
    sys.stdout.buffer.write(p.stdout)
    sys.stdout.buffer.flush()
    sys.stderr.buffer.write(p.stderr)
    sys.stderr.buffer.flush()
    return p.returncode if p.returncode >= 0 else 128 - p.returncode


if __name__ == "__main__":
    sys.exit(main())
