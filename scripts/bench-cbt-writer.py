#!/usr/bin/env python3
"""Writer for `make bench`'s change-tracking section (scripts/bench-cbt.sh).

  burst DEV SIZE COUNT SEED   write COUNT distinct random 64 KiB blocks of random data at
                              random block-aligned offsets of DEV (O_DIRECT), print the bytes
  race DEV SIZE RATE_MB SEED OUT
                              write random 4-64 KiB pieces at random 4 KiB-aligned offsets
                              (O_DIRECT) at about RATE_MB MB/s until SIGTERM; every write is
                              complete when OUT appears (written, with the byte count,
                              after the last write; the signal only ends the loop)

O_DIRECT: every write reaches the block layer (and the agent's tracker) before pwrite returns.
"""
import mmap
import os
import random
import signal
import sys
import time

BLOCK = 65536


def open_direct(dev):
    return os.open(dev, os.O_WRONLY | os.O_DIRECT)


def burst(dev, size, count, seed):
    rng = random.Random(seed)
    nblocks = size // BLOCK
    picks = rng.sample(range(nblocks), count)
    fd = open_direct(dev)
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    for b in picks:
        buf.seek(0)
        buf.write(rng.randbytes(BLOCK))
        os.pwrite(fd, buf, b * BLOCK)
    os.close(fd)
    print(count * BLOCK)


def race(dev, size, rate_mb, seed, out):
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    rng = random.Random(seed)
    fd = open_direct(dev)
    buf = mmap.mmap(-1, BLOCK)
    buf.write(rng.randbytes(BLOCK))
    written = 0
    t0 = time.monotonic()
    while not stop:
        n = 4096 * rng.randint(1, 16)
        off = 4096 * rng.randrange((size - n) // 4096)
        buf.seek(0)
        buf.write(rng.randbytes(64))  # fresh content each write
        os.pwrite(fd, memoryview(buf)[:n], off)
        written += n
        ahead = written / (rate_mb * 1e6) - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)
    os.fsync(fd)
    os.close(fd)
    with open(out + ".tmp", "w") as f:
        f.write(f"{written}\n")
    os.rename(out + ".tmp", out)


def main():
    mode, dev, size, n, seed = sys.argv[1:6]
    if mode == "burst":
        burst(dev, int(size), int(n), int(seed))
    elif mode == "race":
        race(dev, int(size), float(n), int(seed), sys.argv[6])
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
