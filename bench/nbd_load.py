#!/usr/bin/env python3
"""NBD load: many connections, some of them hostile, against livesnapd and
qemu-storage-daemon side by side.

Each daemon serves the same 64 MiB raw image of random data on a unix socket
with no connection limit. Against each one, in this order:
  idle    connections that negotiate and then sit there;
  slow    connections that pipeline --slow-reads reads of 32 MiB and never
          read a reply (what pins server memory);
  small   well-behaved clients: one 4 KiB random read at a time, timed;
  large   well-behaved clients: one 1 MiB random read at a time, timed;
for --seconds, while the daemon's VmRSS is sampled. Then the slow clients
close and the daemon's VmRSS is read again after --settle seconds.

Prints a markdown table: peak memory (VmHWM), memory after the slow clients
left, and the well-behaved clients' p50/p99/max latency and request count.
Every read of a well-behaved client is checked against the image's bytes.

With --clients 1,10,100 it measures scaling instead: for each count, that many
well-behaved 4 KiB readers alone (no idle or slow connections), and prints
peak memory, total requests per second and p50/p99 latency per daemon.
A 'before' daemon (an older livesnapd, --before-bin) can join either run.

Usage: bench/nbd_load.py [--idle N] [--slow N] [--slow-reads N] [--small N]
                         [--large N] [--seconds S] [--settle S] [--clients N,N,...]
                         [--daemons livesnapd,qsd[,before]] [--livesnapd PATH]
                         [--before-bin PATH]
Needs: qemu-storage-daemon, a release build of livesnapd (cargo build --release -p livesnapd).
"""

import argparse
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nbd_fio import wait_socket  # noqa: E402  (the sibling benchmark)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64 << 20
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_GO = 7
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
CMD_READ = 0


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing for {pid}")


def recv_exact(s, n):
    b = bytearray()
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError(f"connection closed after {len(b)} of {n} bytes")
        b += c
    return bytes(b)


def connect(sock):
    """Fixed newstyle handshake with NBD_OPT_GO on export 'disk', compact headers, simple replies."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    magic, opt, _flags = struct.unpack(">QQH", recv_exact(s, 18))
    assert magic == NBDMAGIC and opt == IHAVEOPT
    s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    data = struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
    while True:
        _m, _o, typ, length = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, length)
        if typ == 1:
            return s
        if typ & 0x80000000:
            raise RuntimeError(f"NBD_OPT_GO failed: {typ:#x}")


def read_request(cookie, offset, length):
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, cookie, offset, length)


def timed_reader(sock, size, image, deadline, out, errors):
    """One request at a time; records each round trip in seconds."""
    try:
        s = connect(sock)
        rng = random.Random(size)
        n = 0
        while time.time() < deadline:
            off = rng.randrange(0, SIZE - size + 1, 4096)
            t0 = time.perf_counter()
            s.sendall(read_request(n, off, size))
            magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
            data = recv_exact(s, size)
            out.append(time.perf_counter() - t0)
            if magic != SIMPLE_REPLY_MAGIC or err != 0 or cookie != n:
                errors.append(f"bad reply magic {magic:#x} error {err} cookie {cookie}")
            elif data != image[off:off + size]:
                errors.append(f"wrong data at {off}")
            n += 1
        s.close()
    except Exception as e:  # noqa: BLE001 - reported with the figures
        errors.append(repr(e))


def pct(v, p):
    if not v:
        return float("nan")
    v = sorted(v)
    return v[min(len(v) - 1, int(p / 100 * len(v)))]


def run(name, cmd, sock, image, a):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_socket(sock)
        base = status_kib(p.pid, "VmRSS")
        idle = [connect(sock) for _ in range(a.idle)]
        slow = []
        for i in range(a.slow):
            s = connect(sock)
            burst = b"".join(read_request(k, (k % 2) * (32 << 20), 32 << 20)
                             for k in range(a.slow_reads))
            s.setblocking(False)
            try:
                s.sendall(burst)
            except BlockingIOError:
                pass  # the server stopped reading: that is the point
            slow.append(s)
        deadline = time.time() + a.seconds
        lat = {"4 KiB": [], "1 MiB": []}
        errors = []
        threads = [threading.Thread(target=timed_reader,
                                    args=(sock, 4096, image, deadline, lat["4 KiB"], errors))
                   for _ in range(a.small)]
        threads += [threading.Thread(target=timed_reader,
                                     args=(sock, 1 << 20, image, deadline, lat["1 MiB"], errors))
                    for _ in range(a.large)]
        for t in threads:
            t.start()
        peak_rss = base
        while any(t.is_alive() for t in threads):
            if p.poll() is not None:
                errors.append(f"{name} exited with {p.returncode}")
                break
            peak_rss = max(peak_rss, status_kib(p.pid, "VmRSS"))
            time.sleep(0.1)
        for t in threads:
            t.join()
        alive = p.poll() is None
        hwm = status_kib(p.pid, "VmHWM") if alive else float("nan")
        for s in slow + idle:
            s.close()
        time.sleep(a.settle)
        after = status_kib(p.pid, "VmRSS") if alive else float("nan")
        return {"base": base, "hwm": hwm, "after": after, "lat": lat, "errors": errors}
    finally:
        p.terminate()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--idle", type=int, default=200)
    ap.add_argument("--slow", type=int, default=4)
    ap.add_argument("--slow-reads", type=int, default=200)
    ap.add_argument("--small", type=int, default=8)
    ap.add_argument("--large", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--settle", type=float, default=3)
    ap.add_argument("--daemons", default="livesnapd,qsd")
    ap.add_argument("--livesnapd", default=os.path.join(ROOT, "target/release/livesnapd"))
    ap.add_argument("--before-bin", default=None, help="an older livesnapd, daemon 'before'")
    ap.add_argument("--clients", default=None,
                    help="comma-separated client counts: run the scaling table instead")
    a = ap.parse_args()
    if a.before_bin and "before" not in a.daemons.split(","):
        a.daemons += ",before"

    with tempfile.TemporaryDirectory() as d:
        img = os.path.join(d, "disk.img")
        image = os.urandom(SIZE)
        with open(img, "wb") as f:
            f.write(image)
        cmds = {
            "livesnapd": lambda sock: [a.livesnapd, "--image", img, "--nbd", f"unix:{sock}",
                                       "--max-connections", "0"],
            "before": lambda sock: [a.before_bin, "--image", img, "--nbd", f"unix:{sock}",
                                    "--max-connections", "0"],
            "qsd": lambda sock: [
                "qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=disk,filename={img}",
                "--nbd-server", f"addr.type=unix,addr.path={sock},max-connections=0",
                "--export", "type=nbd,id=export0,node-name=disk,name=disk,writable=on"],
        }
        if a.clients:
            return scaling(a, cmds, d, image)
        rows = []
        for name in a.daemons.split(","):
            sock = os.path.join(d, f"{name}.sock")
            r = run(name, cmds[name](sock), sock, image, a)
            rows.append((name, r))
            if os.path.exists(sock):
                os.unlink(sock)

    print(f"{a.idle} idle, {a.slow} slow ({a.slow_reads} x 32 MiB reads, never read), "
          f"{a.small} x 4 KiB and {a.large} x 1 MiB well-behaved readers, {a.seconds:g} s\n")
    print("| daemon | VmRSS start | peak (VmHWM) | VmRSS after slow left | "
          "4 KiB p50 / p99 / max (n) | 1 MiB p50 / p99 / max (n) | errors |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        cells = []
        for k in ("4 KiB", "1 MiB"):
            v = r["lat"][k]
            cells.append(f"{pct(v, 50) * 1e3:.2f} / {pct(v, 99) * 1e3:.2f} / "
                         f"{max(v, default=float('nan')) * 1e3:.1f} ms ({len(v)})")
        print(f"| {name} | {r['base'] / 1024:.0f} MiB | {r['hwm'] / 1024:.0f} MiB | "
              f"{r['after'] / 1024:.0f} MiB | {cells[0]} | {cells[1]} | "
              f"{len(r['errors'])} {r['errors'][:2] if r['errors'] else ''} |")


def scaling(a, cmds, d, image):
    """The --clients table: N well-behaved 4 KiB readers, nothing else, per daemon."""
    rows = []
    for n in [int(x) for x in a.clients.split(",")]:
        # Daemons alternate per count, so drift on a shared machine hits each alike.
        names = a.daemons.split(",")
        for name in (names if len(rows) % 2 == 0 else names[::-1]):
            sock = os.path.join(d, f"{name}.sock")
            only = argparse.Namespace(**{**vars(a), "idle": 0, "slow": 0, "small": n,
                                         "large": 0, "settle": 0})
            r = run(name, cmds[name](sock), sock, image, only)
            rows.append((n, name, r))
            if os.path.exists(sock):
                os.unlink(sock)
    print(f"N well-behaved clients, each one 4 KiB random read at a time, {a.seconds:g} s\n")
    print("| clients | daemon | peak (VmHWM) | requests/s | p50 | p99 | errors |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for n, name, r in sorted(rows, key=lambda x: (x[0], x[1])):
        v = r["lat"]["4 KiB"]
        print(f"| {n} | {name} | {r['hwm'] / 1024:.1f} MiB | {len(v) / a.seconds:.0f} | "
              f"{pct(v, 50) * 1e3:.3f} ms | {pct(v, 99) * 1e3:.3f} ms | "
              f"{len(r['errors'])} {r['errors'][:2] if r['errors'] else ''} |")


if __name__ == "__main__":
    sys.exit(main())
