#!/usr/bin/env python3
"""Side-by-side NBD benchmark: livesnapd vs qemu-storage-daemon.

Serves the same image from both daemons (each on its own unix socket, page
cache, no O_DIRECT), runs the same fio jobs (ioengine=nbd) against each in one
run, alternating daemons per job so drift on this shared machine hits both, and
prints a markdown table with the livesnapd/qsd ratio per row. Image set-ups:
  raw            a raw image of random data
  qcow2          a fresh qcow2 (every first write allocates a cluster)
  qcow2-backing  a fresh qcow2 over a raw backing of random data (first
                 writes copy the rest of their cluster from the backing)
  qcow2-bitmap   a fresh qcow2 with an enabled persistent dirty bitmap (made
                 by qemu-img bitmap --add): what tracking writes costs; in
                 livesnapd the bitmap is also kept crash-safe
qcow2 images are made anew for every run, so each daemon starts from the same state.
With --before-bin a third daemon (an older livesnapd build) runs in the same
rotation, so before, after and qsd land in one table.

Usage: bench/nbd_fio.py [--formats raw,qcow2,qcow2-backing,qcow2-bitmap]
                        [--jobs '4k randwrite QD1,...'] [--runtime SECONDS]
                        [--size BYTES] [--repeat N] [--out FILE]
                        [--binary PATH] [--before-bin PATH]
Needs: fio (with the nbd engine), qemu-storage-daemon, a release build of livesnapd.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

JOBS = [
    # name, rw, bs, iodepth, numjobs (one NBD connection each)
    ("4k randread QD1", "randread", "4k", 1, 1),
    ("4k randread QD32", "randread", "4k", 32, 1),
    ("4k randwrite QD1", "randwrite", "4k", 1, 1),
    ("4k randwrite QD32", "randwrite", "4k", 32, 1),
    ("1M seq read QD8", "read", "1m", 8, 1),
    ("1M seq write QD8", "write", "1m", 8, 1),
    # randrw is 70 % reads; IOPS and MiB/s are reads and writes together
    ("4k randrw 70/30 QD4 x2 connections", "randrw", "4k", 4, 2),
    ("16k randread QD16", "randread", "16k", 16, 1),
    ("64k randwrite QD8", "randwrite", "64k", 8, 1),
]


def prepare_image(setup, raw, qcow2, size):
    """Returns (image, format) for one run of `setup` over the random-data `raw`:
    raw itself, or `qcow2` made anew (over `raw` for qcow2-backing)."""
    if setup == "raw":
        return raw, "raw"
    if os.path.exists(qcow2):
        os.unlink(qcow2)
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", qcow2, str(size)]
    if setup == "qcow2-backing":
        cmd[5:5] = ["-b", raw, "-F", "raw"]
    subprocess.run(cmd, check=True)
    if setup == "qcow2-bitmap":
        subprocess.run(["qemu-img", "bitmap", "--add", qcow2, "tracking"], check=True)
    return qcow2, "qcow2"


def wait_socket(path, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.05)
    raise RuntimeError(f"socket {path} never came up")


def start_qsd(image, fmt, sock):
    p = subprocess.Popen([
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=disk-file,filename={image}",
        "--blockdev", f"driver={fmt},node-name=disk,file=disk-file",
        "--nbd-server", f"addr.type=unix,addr.path={sock},max-connections=0",
        "--export", "type=nbd,id=export0,node-name=disk,name=disk,writable=on",
    ])
    wait_socket(sock)
    return p


def start_livesnapd(binary, image, fmt, sock, qmp):
    p = subprocess.Popen([binary, "--image", image, "--format", fmt, "--nbd", f"unix:{sock}",
                          "--qmp", qmp, "--max-connections", "0"],
                         stdout=subprocess.DEVNULL)
    wait_socket(sock)
    return p


def stop(p):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def fio(sock, rw, bs, iodepth, numjobs, runtime, size):
    """(IOPS, MiB/s, mean completion latency in us) of reads and writes together."""
    uri = f"nbd+unix:///disk?socket={sock}"
    out = subprocess.run([
        "fio", "--name=job", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
        f"--bs={bs}", f"--iodepth={iodepth}", f"--size={size}",
        f"--numjobs={numjobs}", "--group_reporting", "--rwmixread=70",
        f"--runtime={runtime}", "--time_based", "--ramp_time=1",
        "--randrepeat=0", "--output-format=json",
    ], check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    sides = [job[k] for k in ("read", "write") if job[k]["total_ios"] > 0]
    iops = sum(s["iops"] for s in sides)
    bw = sum(s["bw_bytes"] for s in sides) / (1 << 20)
    lat = sum(s["clat_ns"]["mean"] * s["iops"] for s in sides) / max(iops, 1) / 1000
    return iops, bw, lat


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="raw,qcow2,qcow2-backing")
    ap.add_argument("--jobs", default=None, help="comma-separated job names (default: all)")
    ap.add_argument("--runtime", type=int, default=8)
    ap.add_argument("--size", type=int, default=1 << 30)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/livesnapd"))
    ap.add_argument("--before-bin", default=None,
                    help="an older livesnapd to run as a third daemon ('before')")
    args = ap.parse_args()

    for tool in ("fio", "qemu-storage-daemon"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: apt-get install -y fio qemu-utils")
    if not os.path.exists(args.binary):
        subprocess.run(["cargo", "build", "--release", "-p", "livesnapd"], cwd=ROOT, check=True)

    work = tempfile.mkdtemp(prefix="livesnap-bench-")
    raw = os.path.join(work, "disk.img")
    # Fully written with random data: neither daemon pays for allocation, and
    # neither can answer reads with holes or zero detection.
    subprocess.run(["dd", "if=/dev/urandom", f"of={raw}", "bs=1M",
                    f"count={args.size >> 20}", "status=none"], check=True)
    qcow2 = os.path.join(work, "disk.qcow2")

    daemons = ["qsd", "livesnapd"] + (["before"] if args.before_bin else [])
    socks = {d: os.path.join(work, f"{d}.sock") for d in daemons}

    def start(d, image, fmt):
        if d == "qsd":
            return start_qsd(image, fmt, socks["qsd"])
        binary = args.before_bin if d == "before" else args.binary
        return start_livesnapd(binary, image, fmt, socks[d], os.path.join(work, f"{d}-qmp.sock"))

    setups = args.formats.split(",")
    jobs = [j for j in JOBS if args.jobs is None or j[0] in args.jobs.split(",")]
    results = {}
    peak = {}
    try:
        # Set-ups alternate inside each repetition, as the daemons do, so that
        # drift on this shared machine hits every set-up of a job alike.
        for name, rw, bs, qd, nj in jobs:
            for rep in range(args.repeat):
                for setup in setups:
                    # Each daemon goes first in turn.
                    order = daemons[rep % len(daemons):] + daemons[:rep % len(daemons)]
                    for d in order:
                        image, fmt = prepare_image(setup, raw, qcow2, args.size)
                        p = start(d, image, fmt)
                        try:
                            r = fio(socks[d], rw, bs, qd, nj, args.runtime, args.size)
                            hwm = rss_kib(p.pid)
                            peak[d] = max(peak.get(d, 0), hwm)
                        finally:
                            stop(p)
                        results.setdefault((setup, name, d), []).append(r)
                        print(f"{setup:14} {name:18} {d:10} {r[0]:10.0f} IOPS {r[1]:8.1f} MiB/s "
                              f"{r[2]:8.1f} us  VmHWM {hwm / 1024:.1f} MiB",
                              file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def best(key):
        return max(results[key], key=lambda r: r[0])

    lines = [
        f"Machine: {platform.node()}, {os.cpu_count()} cores, {platform.platform()}; "
        f"fio {subprocess.run(['fio', '--version'], capture_output=True, text=True).stdout.strip()}, "
        f"{subprocess.run(['qemu-storage-daemon', '--version'], capture_output=True, text=True).stdout.splitlines()[0]}",
        f"Image {args.size >> 20} MiB on the page cache, unix socket, {args.runtime} s per run, "
        f"best of {args.repeat} runs per daemon.",
        "",
    ]
    shown = daemons[:1] + daemons[2:] + daemons[1:2]  # qsd, before, livesnapd
    lines.append("| image | job | " + " | ".join(f"{d} IOPS" for d in shown) + " | "
                 + " | ".join(f"{d} MiB/s" for d in shown) + " | "
                 + " | ".join(f"ratio {d}/qsd" for d in shown[1:]) + " |")
    lines.append("|---|---|" + "---:|" * (3 * len(shown) - 1))
    for setup in setups:
        for name, *_ in jobs:
            r = [best((setup, name, d)) for d in shown]
            lines.append(f"| {setup} | {name} | " + " | ".join(f"{x[0]:.0f}" for x in r) + " | "
                         + " | ".join(f"{x[1]:.1f}" for x in r) + " | "
                         + " | ".join(f"{x[0] / r[0][0]:.2f}" for x in r[1:]) + " |")
    lines.append("")
    lines.append("Peak RSS (VmHWM, largest of all runs): "
                 + ", ".join(f"{d} {peak.get(d, 0) / 1024:.1f} MiB" for d in shown) + ".")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
