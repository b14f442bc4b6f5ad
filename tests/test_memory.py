"""The process-wide memory policy: large buffers freed on other threads go back to the kernel."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROGRAM = textwrap.dedent(
    """
    import sys, threading
    from layerfs.memory import return_large_buffers
    if sys.argv[1] == "policy":
        assert return_large_buffers()

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024

    def work():  # buffers of the sizes of pack ranges and packs, touched, then freed
        for size in (4, 8, 16, 24, 8, 4, 12):
            buf = bytearray(size << 20)
            buf[::4096] = b"x" * len(buf[::4096])
            del buf

    base = rss_mib()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(rss_mib() - base)
    """
)


def _kept_mib(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


def test_large_buffers_freed_on_threads_are_returned() -> None:
    assert _kept_mib("policy") < 8
    # without it glibc's raised mmap threshold leaves them in the threads' heaps
    assert _kept_mib("default") > 32
