"""bench_ids: the speed of the repository's AEADs, keyed content IDs and password KDFs.

Measures, on one core, AES-256-GCM and ChaCha20-Poly1305 (``cryptography``)
sealing and opening, and the keyed hashes HMAC-SHA256 (``hmac``) and keyed
BLAKE3 (``blake3``, single-threaded), on 4 KiB, 64 KiB and 1 MiB inputs;
xxh3-128 (today's content IDs) and plain SHA-256 are listed for reference.
Each figure is MB/s (10^6 bytes) of CPU time, the best of ``--rounds``
rounds of about ``--seconds`` each: CPU time and the best round keep out most
of what other jobs on a busy machine do to wall-clock figures. ``--kdf`` also
times the password KDFs at the default and a few other parameters.
layerfs.repo.crypto and layerfs.repo.keys explain the choices made from these
figures.

    .venv/bin/python -m benchmarks.bench_ids --kdf           # ~1 min
    .venv/bin/python -m benchmarks.bench_ids --kdf --write   # and into RESULTS.md
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import time
from collections.abc import Callable

SIZES = (4 << 10, 64 << 10, 1 << 20)


def _rate(fn: Callable[[bytes], object], data: bytes, seconds: float, rounds: int) -> float:
    """Best MB/s of CPU time over ``rounds`` rounds of about ``seconds`` each."""
    fn(data)  # warm up
    t0 = time.process_time()
    n = 0
    while time.process_time() - t0 < 0.05:
        fn(data)
        n += 1
    per_call = max((time.process_time() - t0) / n, 1e-9)
    calls = max(1, int(seconds / per_call))
    best = 0.0
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(calls):
            fn(data)
        elapsed = time.process_time() - t0
        if elapsed > 0:
            best = max(best, len(data) * calls / elapsed / 1e6)
    return best


def _candidates() -> dict[str, Callable[[bytes], object]]:
    import blake3
    import xxhash
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    key, ad = os.urandom(32), b"chunk\x00" + b"0" * 64
    gcm, chacha = AESGCM(key), ChaCha20Poly1305(key)

    def opener(aead: AESGCM | ChaCha20Poly1305) -> Callable[[bytes], object]:
        sealed: dict[int, tuple[bytes, bytes]] = {}

        def open_(data: bytes) -> object:
            if len(data) not in sealed:
                nonce = os.urandom(12)
                sealed[len(data)] = (nonce, aead.encrypt(nonce, data, ad))
            nonce, ct = sealed[len(data)]
            return aead.decrypt(nonce, ct, ad)

        return open_

    return {
        "AES-256-GCM seal": lambda d: gcm.encrypt(os.urandom(12), d, ad),
        "AES-256-GCM open": opener(gcm),
        "ChaCha20-Poly1305 seal": lambda d: chacha.encrypt(os.urandom(12), d, ad),
        "ChaCha20-Poly1305 open": opener(chacha),
        "HMAC-SHA256": lambda d: hmac.digest(key, d, "sha256"),
        "keyed BLAKE3": lambda d: blake3.blake3(d, key=key).digest(),
        "SHA-256 (unkeyed, reference)": lambda d: hashlib.sha256(d).digest(),
        "xxh3-128 (today's IDs, reference)": lambda d: xxhash.xxh3_128_digest(d),
    }


def measure(seconds: float, rounds: int) -> list[list[object]]:
    rows: list[list[object]] = []
    inputs = {size: os.urandom(size) for size in SIZES}
    for name, fn in _candidates().items():
        rows.append([name, *(f"{_rate(fn, inputs[s], seconds, rounds):,.0f}" for s in SIZES)])
    return rows


def _kdf_time(fn: Callable[[], object], reps: int = 5) -> tuple[float, float, float]:
    """Best wall, median wall and median CPU seconds of ``fn``."""
    walls, cpus = [], []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), sorted(walls)[reps // 2], sorted(cpus)[reps // 2]


def measure_kdf() -> list[list[object]]:
    from layerfs.repo.keys import DEFAULT_PARAMS, KdfParams, derive

    salt = os.urandom(16)
    choices = [
        DEFAULT_PARAMS,
        KdfParams("argon2id", {"time_cost": 3, "memory_kib": 128 << 10, "parallelism": 2}),
        KdfParams("argon2id", {"time_cost": 3, "memory_kib": 256 << 10, "parallelism": 2}),
        KdfParams("argon2id", {"time_cost": 4, "memory_kib": 256 << 10, "parallelism": 2}),
        KdfParams("argon2id", {"time_cost": 4, "memory_kib": 64 << 10, "parallelism": 1}),
        KdfParams("scrypt", {"n": 1 << 17, "r": 8, "p": 1}),
        KdfParams("scrypt", {"n": 1 << 18, "r": 8, "p": 1}),
    ]
    rows: list[list[object]] = []
    for params in choices:
        best, wall, cpu = _kdf_time(lambda p=params: derive(b"correct horse", salt, p))
        label = ", ".join(f"{k}={v}" for k, v in params.params.items())
        default = " (default)" if params == DEFAULT_PARAMS else ""
        rows.append(
            [
                f"{params.kdf}{default}",
                label,
                f"{params.memory_bytes() >> 20}",
                f"{best:.2f}",
                f"{wall:.2f}",
                f"{cpu:.2f}",
            ]
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.3, help="length of one round (0.3)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per figure; the best counts (5)")
    ap.add_argument("--kdf", action="store_true", help="also time the password KDFs")
    ap.add_argument("--write", action="store_true", help="write the ids section of RESULTS.md")
    args = ap.parse_args()

    from benchmarks.common import command_line, environment_summary, markdown_table, write_section

    load = os.getloadavg()[0]
    headers = ["operation", "4 KiB MB/s", "64 KiB MB/s", "1 MiB MB/s"]
    parts = [
        "## bench_ids: AEADs, keyed content IDs and password KDFs",
        "",
        f"    {command_line()}",
        "",
        "One core, MB/s (10^6 bytes) of CPU time, best of "
        f"{args.rounds} rounds of ~{args.seconds} s. Seal includes the random nonce.",
        "",
        markdown_table(headers, measure(args.seconds, args.rounds)),
    ]
    if args.kdf:
        parts += [
            "",
            "Password KDFs, one derivation, 5 times (wall time is what a user waits; the best "
            "is closest to an idle machine):",
            "",
            markdown_table(
                ["kdf", "parameters", "MiB", "best wall s", "median wall s", "median CPU s"],
                measure_kdf(),
            ),
        ]
    parts += [
        "",
        "The choices taken from these figures (AES-256-GCM, keyed BLAKE3, Argon2id's default "
        "parameters) are explained in the docstrings of layerfs/repo/crypto.py and keys.py.",
        "",
        environment_summary(load),
    ]
    text = "\n".join(parts)
    print(text)
    if args.write:
        write_section("ids", text)


if __name__ == "__main__":
    main()
