#!/usr/bin/python3
"""Incremental backup benchmark: livesnapd vs qemu-storage-daemon (qsd).

For each share of the disk changed (--changed, default 1 % and 10 %), each
daemon in the same run, alternating per repetition:
  1. a fresh copy of a qcow2 source full of random data (default 1 GiB,
     --size) with an enabled persistent bitmap made by `qemu-img bitmap --add`
     (clean: the "last backup" instant);
  2. the daemon opens it over QMP (cache.direct by default, as Nova's
     cache=none) and exports it over NBD; fio writes the changed share in
     distinct random 64 KiB blocks (ioengine=nbd), then stops;
  3. blockdev-backup sync=incremental with that bitmap into a fresh qcow2
     target; the job time is the command to BLOCK_JOB_COMPLETED, the bytes
     copied are the job's `len` and the data the target holds.
No guest I/O runs during the job: this measures what an incremental costs
and that it copies only what changed, not gentleness (bench/jobs.py does).

Usage:
  bench/incremental.py [--size 1G] [--changed 0.01,0.1] [--repeat N]
                       [--cache direct|writeback] [--livesnapd-bin PATH]
                       [--livesnapd-as-qsd] [--out FILE]
Needs what bench/jobs.py needs (fio, qemu-utils, a release livesnapd); it
borrows that script's QMP client and daemon handling.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jobs  # noqa: E402  (the sibling benchmark: QMP client, daemons)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 64 << 10


def allocated(path):
    """Bytes of guest data the qcow2 image at `path` holds (qemu-img map)."""
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", path],
                         check=True, capture_output=True, text=True).stdout
    return sum(e["length"] for e in json.loads(out) if e.get("data"))


def dirty_writes(sock, size, changed, seed):
    """Writes `changed` of the disk in distinct random 64 KiB blocks."""
    n = max(1, int(size * changed) // BLOCK)
    subprocess.run([
        "fio", "--name=change", "--ioengine=nbd", f"--uri=nbd+unix:///disk?socket={sock}",
        "--rw=randwrite", f"--bs={BLOCK}", f"--size={size}", f"--io_size={n * BLOCK}",
        "--iodepth=16", f"--randseed={seed}", "--output-format=terse",
    ], check=True, capture_output=True, timeout=600)
    return n * BLOCK


def run_one(args, slot, kind, binary, work, base, changed, rep):
    src = os.path.join(work, f"{slot}-src.qcow2")
    tgt = os.path.join(work, f"{slot}-tgt.qcow2")
    shutil.copyfile(base, src)
    subprocess.run(["qemu-img", "bitmap", "--add", src, "b0"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tgt, str(args.size)], check=True)
    d = jobs.Daemon(slot, kind, binary, work, slot, args.cache == "direct", None)
    try:
        d.start()
        d.blockdev_add("src", src, "qcow2")
        d.export("src")
        written = dirty_writes(d.nbd_path, args.size, changed, 1000 + rep)
        d.blockdev_add("tgt", tgt, "qcow2")
        info = {b["name"]: b for n in d.qmp.cmd("query-named-block-nodes", {"flat": True})
                if n["node-name"] == "src" for b in n.get("dirty-bitmaps", [])}
        count = info.get("b0", {}).get("count")
        t0 = time.monotonic()
        t0_wall = time.time()
        d.qmp.cmd("blockdev-backup", {"job-id": "inc", "device": "src", "target": "tgt",
                                      "sync": "incremental", "bitmap": "b0"}, timeout=60)
        done = None
        while time.monotonic() - t0 < args.cap:
            ev = d.qmp.next_event(args.cap)
            if ev and ev[1]["event"] == "BLOCK_JOB_COMPLETED":
                done = ev
                break
        if done is None:
            raise RuntimeError(f"{slot}: no BLOCK_JOB_COMPLETED within {args.cap} s")
        job_s = done[0] - t0_wall
        data = done[1]["data"]
        if "error" in data:
            raise RuntimeError(f"{slot}: backup failed: {data['error']}")
        d.qmp.cmd("blockdev-del", {"node-name": "tgt"}, timeout=30)
    finally:
        d.stop()
    return {"slot": slot, "changed": changed, "rep": rep, "written": written,
            "bitmap_count": count, "job_s": job_s, "len": data["len"],
            "target_data": allocated(tgt)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--changed", default="0.01,0.1")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cache", default="direct", choices=["direct", "writeback"])
    ap.add_argument("--cap", type=float, default=120.0)
    ap.add_argument("--livesnapd-bin", default=os.path.join(ROOT, "target/release/livesnapd"))
    ap.add_argument("--livesnapd-as-qsd", action="store_true",
                    help="run qsd in the livesnapd slot too (validates this script)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.size = jobs.parse_size(args.size)
    qsd = shutil.which("qemu-storage-daemon")
    slots = {"qsd": ("qsd", qsd),
             "livesnapd": ("qsd", qsd) if args.livesnapd_as_qsd else ("livesnapd", args.livesnapd_bin)}
    if not args.livesnapd_as_qsd and not os.path.exists(args.livesnapd_bin):
        subprocess.run(["cargo", "build", "--release", "-p", "livesnapd"], cwd=ROOT, check=True)

    work = tempfile.mkdtemp(prefix="livesnap-incr-")
    runs = []
    try:
        raw = os.path.join(work, "random.raw")
        subprocess.run(["dd", "if=/dev/urandom", f"of={raw}", "bs=1M",
                        f"count={args.size >> 20}", "status=none"], check=True)
        base = os.path.join(work, "base.qcow2")
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, base], check=True)
        os.unlink(raw)
        for changed in [float(c) for c in args.changed.split(",")]:
            for rep in range(args.repeat):
                order = ["qsd", "livesnapd"] if rep % 2 == 0 else ["livesnapd", "qsd"]
                for slot in order:
                    kind, binary = slots[slot]
                    r = run_one(args, slot, kind, binary, work, base, changed, rep)
                    runs.append(r)
                    jobs.log(f"{slot:9} changed {changed:.0%} rep {rep}: job {r['job_s']:.3f} s, "
                             f"len {r['len'] >> 20} MiB, target data {r['target_data'] >> 20} MiB, "
                             f"bitmap count {r['bitmap_count']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(changed, slot, key):
        xs = sorted(r[key] for r in runs if r["changed"] == changed and r["slot"] == slot)
        return xs[len(xs) // 2]

    lines = [
        f"Machine: {platform.node()}, {os.cpu_count()} cores; load average at the end "
        f"{os.getloadavg()[0]:.1f}; {jobs.daemon_version('qsd', qsd)}"
        + (" (in both slots)" if args.livesnapd_as_qsd else ""),
        f"Source qcow2 {args.size >> 20} MiB of random data, cache.{args.cache}, "
        f"{BLOCK >> 10} KiB blocks changed, median of {args.repeat} runs per daemon.",
        "",
        "| changed | written | qsd job s | livesnapd job s | ratio (livesnapd/qsd) "
        "| qsd copied | livesnapd copied | qsd target data | livesnapd target data |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for changed in sorted({r["changed"] for r in runs}):
        q, lv = med(changed, "qsd", "job_s"), med(changed, "livesnapd", "job_s")
        lines.append(
            f"| {changed:.0%} | {med(changed, 'qsd', 'written') >> 20} MiB | {q:.3f} | {lv:.3f} "
            f"| {lv / q:.2f} | {med(changed, 'qsd', 'len') >> 20} MiB "
            f"| {med(changed, 'livesnapd', 'len') >> 20} MiB "
            f"| {med(changed, 'qsd', 'target_data') >> 20} MiB "
            f"| {med(changed, 'livesnapd', 'target_data') >> 20} MiB |")
    table = "\n".join(lines)
    jobs.publish(table, args.out)


if __name__ == "__main__":
    main()
