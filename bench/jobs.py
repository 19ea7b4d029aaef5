#!/usr/bin/python3
"""Side-by-side block-job benchmark: livesnapd vs qemu-storage-daemon (qsd).

Each daemon in the same run gets its own copy of a raw source image full of
random data (default 1 GiB, --size), opened with cache.direct=on (O_DIRECT,
Nova's cache=none; --cache writeback for the page cache), exported over NBD on
a unix socket, and written by the same fio writer (ioengine=nbd, random writes,
bssplit 4k-64k, iodepth 16, fio's bandwidth log every 100 ms). Every run starts
a fresh daemon configured over QMP (blockdev-add, nbd-server-start,
block-export-add), so both daemons see exactly the same command sequence.

Scenarios (--scenarios a,b,c):
  a  no speed limit. Busy guest: guest throughput before and during the job and
     the job time, for blockdev-backup sync=full and blockdev-mirror sync=full.
     Mirror: at BLOCK_JOB_READY the script sends block-job-complete; job time is
     job start -> BLOCK_JOB_COMPLETED. A job not done within --cap (default 60 s)
     is reported as "did not finish" and cancelled with block-job-cancel
     force=true. Idle guest (no fio): job time for backup and mirror.
  b  a mirror with a speed limit well below the writer's rate (--speed; default
     size/12 s): qsd's background mirror against livesnapd's copy-mode "auto"
     (a livesnapd extension). query-block-jobs is polled every 100 ms
     (remaining = len - offset, status, ready). The cap is 3 x size/speed; the
     target is READY -> complete -> COMPLETED within 1.2 x size/speed.
  c  guest throughput during the job / before it, reported for every busy run
     above; selected alone (or with the others) it also runs a control: the
     writer with no job at all, whose ratio should be about 1.0.
  d  a light writer: fio writing a small export (--light-size, 64 MiB, its own
     image of random data) once at --light-rate (4 MiB/s) in 4 KiB random
     writes at QD1 with verify=crc32c, and a mirror started after 2 s
     (--light-modes, background for both daemons). Reported: READY time,
     whether the writer was still writing then, fio's verify (it reads the
     target after block-job-complete pivoted the export) and the READY time
     ratio livesnapd / qsd (target: at most 1.5).

Mirror copy modes per daemon: --mirror-modes qsd=background,livesnapd=auto
(used in a and b). qsd has no "auto"; when the livesnapd slot runs qsd
(--livesnapd-as-qsd, to validate this script before livesnapd's jobs exist),
"auto" becomes --auto-fallback (default write-blocking, QEMU's closest mode).
Extra QMP arguments for a daemon's job commands: --job-args 'livesnapd={...}'.
A daemon that answers CommandNotFound for a job command is reported as
"unsupported" for that row; the other rows still run.

Outputs: markdown tables on stdout (and --out), a JSON file with every run,
every query-block-jobs sample, job events and the guest throughput series
(--json), a PNG of remaining bytes over time for scenario b (--png,
default docs/bench-mirror-speed-limit.png), and a PNG of the guest's write
throughput over time during the busy backup of scenario a, both daemons
(--guest-png, default docs/bench-guest-backup.png).

Usage:
  bench/jobs.py [--scenarios a,b,c] [--daemons livesnapd,qsd] [--size 1G]
                [--cache direct|writeback] [--runtime S] [--repeat N]
                [--speed BYTES_PER_S] [--cap S] [--livesnapd-bin PATH]
                [--livesnapd-as-qsd] [--json FILE] [--out FILE] [--png FILE]
  Before and after in one run (an earlier build as a third slot):
  bench/jobs.py --daemons livesnapd,qsd,pre-issue --before-bin OLD/livesnapd
  Quick validation with qsd in both slots:
  bench/jobs.py --livesnapd-as-qsd --size 256M --runtime 3 --cap 20 \\
                --png /tmp/jobs.png --json /tmp/jobs.json

Needs: fio (with the nbd engine), qemu-img and qemu-storage-daemon
(apt-get install -y fio qemu-utils), a release build of livesnapd
(CARGO_TARGET_DIR=target cargo build --release -p livesnapd), and for the PNG
matplotlib: `apt-get install -y python3-matplotlib`, which installs it for
Debian's /usr/bin/python3 (hence the shebang; a pyenv python3 on PATH will not
see it). Without matplotlib the PNG is skipped with a warning.

Every daemon and fio process is killed at the end (and dies with the script:
PR_SET_PDEATHSIG), the temporary directory is removed, and every wait has a
timeout.
"""

import argparse
import collections
import ctypes
import glob
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
JOB_ID = "job0"
GUEST_TARGET = 0.8  # guest throughput during / before the job, in every scenario
LIGHT_READY_TARGET = 1.5  # scenario d: livesnapd's READY time / qsd's, at most


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(s):
    s = str(s).strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def die_with_parent():
    """preexec_fn: the child gets SIGKILL if this script dies (even by SIGKILL)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# ---------------------------------------------------------------- QMP client

class QMPError(Exception):
    def __init__(self, cls, desc):
        super().__init__(f"{cls}: {desc}")
        self.cls = cls
        self.desc = desc


class QMPTimeout(Exception):
    pass


class QMPClosed(Exception):
    pass


class QMP:
    """Newline-delimited JSON over a unix socket. A reader thread files replies
    by id and queues events (with their arrival time) as they come, interleaved
    with replies."""

    def __init__(self, path, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.sock.settimeout(None)
        self.cv = threading.Condition()
        self.replies = {}
        self.events = collections.deque()
        self.greeting = None
        self.closed = False
        self.next_id = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + timeout
        with self.cv:
            while self.greeting is None:
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    raise QMPTimeout(f"no QMP greeting on {path} within {timeout} s")
                self.cv.wait(left)
        self.cmd("qmp_capabilities", timeout=timeout)

    def _read(self):
        try:
            for line in self.sock.makefile("rb"):
                line = line.strip()
                if not line:
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                now = time.time()
                with self.cv:
                    if "QMP" in msg:
                        self.greeting = msg
                    elif "event" in msg:
                        self.events.append((now, msg))
                    elif "id" in msg:
                        self.replies[msg["id"]] = msg
                    self.cv.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self.cv:
                self.closed = True
                self.cv.notify_all()

    def cmd(self, name, args=None, timeout=10.0):
        with self.cv:
            self.next_id += 1
            rid = f"bench-{self.next_id}"
        req = {"execute": name, "id": rid}
        if args is not None:
            req["arguments"] = args
        try:
            self.sock.sendall((json.dumps(req) + "\n").encode())
        except OSError as e:
            raise QMPClosed(f"{name}: {e}") from e
        deadline = time.monotonic() + timeout
        with self.cv:
            while rid not in self.replies:
                if self.closed:
                    raise QMPClosed(f"{name}: monitor closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QMPTimeout(f"{name}: no reply within {timeout} s")
                self.cv.wait(left)
            reply = self.replies.pop(rid)
        if "error" in reply:
            raise QMPError(reply["error"].get("class"), reply["error"].get("desc"))
        return reply.get("return")

    def next_event(self, timeout):
        """The oldest queued event as (arrival time, message), or None."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self.cv:
            while not self.events:
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    return None
                self.cv.wait(left)
            return self.events.popleft()

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# ---------------------------------------------------------------- daemons

def wait_socket(path, proc, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} before {path} appeared")
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


class Daemon:
    """One daemon process in one slot ("qsd" or "livesnapd"); `kind` says which
    program actually runs (the livesnapd slot can run qsd as a stand-in)."""

    def __init__(self, slot, kind, binary, work, tag, cache_direct, aio):
        self.slot, self.kind, self.binary = slot, kind, binary
        self.qmp_path = os.path.join(work, f"{tag}-qmp.sock")
        self.nbd_path = os.path.join(work, f"{tag}-nbd.sock")
        self.log_path = os.path.join(work, f"{tag}.log")
        self.cache_direct, self.aio = cache_direct, aio
        self.proc = None
        self.qmp = None

    def start(self):
        for p in (self.qmp_path, self.nbd_path):
            if os.path.exists(p):
                os.unlink(p)
        if self.kind == "qsd":
            argv = [self.binary, "--chardev",
                    f"socket,path={self.qmp_path},server=on,wait=off,id=m", "--monitor", "chardev=m"]
        else:
            argv = [self.binary, "--qmp", self.qmp_path]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        wait_socket(self.qmp_path, self.proc)
        self.qmp = QMP(self.qmp_path)

    def blockdev_add(self, node, filename, fmt):
        cache = {"direct": self.cache_direct, "no-flush": False}
        file_opts = {"driver": "file", "filename": filename, "cache": cache}
        if self.aio:
            file_opts["aio"] = self.aio
        self.qmp.cmd("blockdev-add", {"driver": fmt, "node-name": node, "cache": cache,
                                      "file": file_opts}, timeout=30)

    def export(self, node):
        self.qmp.cmd("nbd-server-start",
                     {"addr": {"type": "unix", "data": {"path": self.nbd_path}}}, timeout=30)
        self.qmp.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": node,
                                          "name": "disk", "writable": True}, timeout=30)

    def stop(self):
        """SIGTERM, then SIGKILL after 10 s. Returns a note if it had to be killed."""
        note = None
        if self.qmp:
            self.qmp.close()
            self.qmp = None
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                note = "did not exit within 10 s of SIGTERM; killed"
                self.proc.kill()
                self.proc.wait(timeout=10)
        return note

    def log_tail(self, n=15):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


def cpu_seconds(pid):
    """utime + stime of a process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def daemon_version(kind, binary):
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0] if out else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


# ---------------------------------------------------------------- fio guest

class Fio:
    def __init__(self, args, nbd_sock, work, tag, runtime, light=False):
        self.prefix = os.path.join(work, f"{tag}-fio")
        self.json_path = self.prefix + ".json"
        self.err_path = self.prefix + ".err"
        for f in glob.glob(self.prefix + "*"):
            os.unlink(f)
        if light:
            # Scenario d: the whole export written once at a low rate, then verified.
            load = ["--bs=4k", "--iodepth=1", f"--rate={args.light_rate}", f"--size={args.light_size}",
                    f"--io_size={args.light_io or args.light_size}", "--verify=crc32c", "--verify_state_save=0",
                    "--randrepeat=0"]
        else:
            load = [f"--bssplit={args.bssplit}", f"--iodepth={args.iodepth}", f"--numjobs={args.numjobs}",
                    f"--size={args.size}", f"--runtime={int(runtime) + 1}", "--time_based",
                    "--randrepeat=0"]
        self.argv = [
            "fio", "--name=guest", "--ioengine=nbd",
            f"--uri=nbd+unix:///disk?socket={nbd_sock}", "--rw=randwrite", *load,
            f"--write_bw_log={self.prefix}",
            f"--log_avg_msec={args.log_msec}", "--log_unix_epoch=1",
            "--output-format=json", f"--output={self.json_path}",
        ]
        self.avg = args.log_msec / 1000.0
        self.proc = None
        self.t_launch = None

    def start(self):
        self.t_launch = time.time()
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         preexec_fn=die_with_parent)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        """SIGINT (fio then writes its logs and JSON), SIGKILL after 15 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def errors(self):
        try:
            with open(self.err_path, errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def curve(self):
        """Cumulative bytes written over wall-clock time: a sorted list of
        (time, bytes). Each bandwidth-log entry (t, KiB/s) covers the interval
        since the previous entry of the same fio job (fio skips empty windows,
        so a gap longer than log_avg_msec is a stall)."""
        per_job = []
        for path in sorted(glob.glob(self.prefix + "_bw.*.log")):
            pts = []
            prev = None
            total = 0.0
            with open(path) as f:
                for line in f:
                    parts = [p.strip() for p in line.split(",")]
                    if len(parts) < 2:
                        continue
                    t = int(parts[0]) / 1000.0
                    bw = int(parts[1]) * 1024.0  # KiB/s -> B/s
                    if prev is None:
                        prev = t - self.avg
                        pts.append((prev, 0.0))
                    total += bw * (t - prev)
                    pts.append((t, total))
                    prev = t
            if pts:
                per_job.append(pts)
        if not per_job:
            return [], []
        if len(per_job) == 1:
            pts = per_job[0]
            return pts, [t for t, _ in pts]
        times = sorted({t for pts in per_job for t, _ in pts})
        merged = [(t, sum(interp(pts, t) for pts in per_job)) for t in times]
        return merged, times

    def io_bytes(self):
        try:
            with open(self.json_path) as f:
                s = f.read()
            data = json.loads(s[s.index("{"):])
            return sum(j["write"]["io_bytes"] for j in data["jobs"])
        except (OSError, ValueError, KeyError):
            return None


def interp(pts, t):
    """Cumulative bytes at time t on a curve of (time, bytes) points."""
    if not pts or t <= pts[0][0]:
        return 0.0 if not pts else pts[0][1]
    if t >= pts[-1][0]:
        return pts[-1][1]
    lo, hi = 0, len(pts) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pts[mid][0] <= t:
            lo = mid
        else:
            hi = mid
    (t0, c0), (t1, c1) = pts[lo], pts[hi]
    return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1


def rate(pts, a, b):
    """Mean bytes/s in [a, b]."""
    if b is None or a is None or b - a <= 0.05:
        return None
    return (interp(pts, b) - interp(pts, a)) / (b - a)


def longest_gap(times, a, b, avg):
    """Longest time in [a, b] with no completed write (seconds beyond one log window)."""
    inside = [t for t in times if a <= t <= b]
    if not inside:
        return b - a
    edges = [a] + inside + [b]
    return max(0.0, max(y - x for x, y in zip(edges, edges[1:])) - avg)


# ---------------------------------------------------------------- one run

def drive_job(d, kind, cap, poll_interval, start_cmd, start_args):
    """Starts the job and follows it to its end or to the cap. Returns a dict of
    times relative to the job start (t0 is absolute)."""
    q = d.qmp
    r = {"status": None, "events": [], "samples": [], "notes": []}
    t0 = time.time()
    r["t0"] = t0
    try:
        q.cmd(start_cmd, start_args, timeout=30)
    except QMPError as e:
        r["status"] = "unsupported" if e.cls == "CommandNotFound" else "error"
        r["error"] = str(e)
        r["t_end"], r["t_ready"] = None, None
        return r
    deadline = t0 + cap
    next_poll = time.time()
    end_kind = None
    ready_t = complete_t = end_t = cancel_t = None
    last_len = last_off = None
    while end_kind is None:
        now = time.time()
        if now >= next_poll:
            try:
                jobs = q.cmd("query-block-jobs", timeout=5)
                tq = time.time()
                for j in jobs or []:
                    if j.get("device") == JOB_ID:
                        last_len, last_off = j.get("len"), j.get("offset")
                        r["samples"].append([round(tq - t0, 3), last_len - last_off, last_len, last_off,
                                             j.get("status"), j.get("ready"), j.get("actively-synced")])
            except QMPTimeout as e:
                r["notes"].append(f"{time.time() - t0:.1f} s: {e}")
            except QMPClosed:
                end_kind = "daemon-died"
                end_t = time.time()
                break
            next_poll = max(next_poll + poll_interval, time.time() + poll_interval / 2)
        now = time.time()
        if cancel_t is None and now >= deadline:
            cancel_t = now
            try:
                q.cmd("block-job-cancel", {"device": JOB_ID, "force": True}, timeout=10)
            except (QMPError, QMPTimeout) as e:
                r["notes"].append(f"block-job-cancel: {e}")
            except QMPClosed:
                end_kind, end_t = "daemon-died", time.time()
                break
        if cancel_t is not None and now >= cancel_t + 10:
            end_kind, end_t = "cancel-hung", now
            break
        wake = next_poll if cancel_t is not None else min(next_poll, deadline)
        ev = q.next_event(wake - time.time())
        if ev is None:
            if q.closed:
                end_kind, end_t = "daemon-died", time.time()
            continue
        t, msg = ev
        data = msg.get("data", {})
        if data.get("device") != JOB_ID and data.get("id") != JOB_ID:
            continue
        name = msg["event"]
        r["events"].append([round(t - t0, 3), name, data])
        if name == "BLOCK_JOB_READY" and ready_t is None:
            ready_t = t
            if kind == "mirror" and cancel_t is None:
                complete_t = time.time()
                try:
                    q.cmd("block-job-complete", {"device": JOB_ID}, timeout=10)
                except (QMPError, QMPTimeout) as e:
                    r["notes"].append(f"block-job-complete: {e}")
                    complete_t = None
                except QMPClosed:
                    end_kind, end_t = "daemon-died", time.time()
        elif name == "BLOCK_JOB_COMPLETED":
            end_kind, end_t = ("failed" if data.get("error") else "completed"), t
            last_len, last_off = data.get("len", last_len), data.get("offset", last_off)
            if data.get("error"):
                r["error"] = data["error"]
        elif name == "BLOCK_JOB_CANCELLED":
            end_kind, end_t = "cancelled", t
            last_len, last_off = data.get("len", last_len), data.get("offset", last_off)
    finished = end_kind == "completed" and cancel_t is None
    r["status"] = "finished" if finished else ("did-not-finish" if end_kind in ("cancelled", "cancel-hung")
                                               and cancel_t is not None else end_kind)
    r["end_kind"] = end_kind
    r["job_time"] = round(end_t - t0, 3) if finished else None
    r["ready_at"] = round(ready_t - t0, 3) if ready_t else None
    r["complete_sent_at"] = round(complete_t - t0, 3) if complete_t else None
    r["complete_took"] = round(end_t - complete_t, 3) if finished and complete_t else None
    r["cancel_at"] = round(cancel_t - t0, 3) if cancel_t else None
    r["end_at"] = round(end_t - t0, 3) if end_t else None
    r["t_end"] = end_t if end_t else time.time()
    r["t_ready"] = ready_t
    r["len"], r["offset"] = last_len, last_off
    r["remaining_at_end"] = (last_len - last_off) if last_len is not None and last_off is not None else None
    return r


def probe_commands(ctx, slot):
    """The daemon's query-commands list (None if it cannot be asked)."""
    d = Daemon(slot, ctx["kinds"][slot], ctx["bins"][slot], ctx["work"], f"{slot}-probe", True, None)
    try:
        d.start()
        return {c["name"] for c in d.qmp.cmd("query-commands")}
    except Exception as e:  # noqa: BLE001 - reported, the runs then find out for themselves
        log(f"{slot}: query-commands failed: {e}")
        return None
    finally:
        d.stop()


JOB_COMMANDS = {"backup": ("blockdev-backup", "query-block-jobs", "block-job-cancel"),
                "mirror": ("blockdev-mirror", "query-block-jobs", "block-job-complete", "block-job-cancel")}


def run_one(ctx, spec, slot, rep):
    """spec: dict(scenario, job ('backup'|'mirror'|'none'), busy, speed, cap)."""
    args = ctx["args"]
    kind = ctx["kinds"][slot]
    light = spec["scenario"] == "d"
    size = args.light_size if light else args.size
    tag = f"{slot}-{spec['scenario']}-{spec['job']}-{'busy' if spec['busy'] else 'idle'}-{rep}"
    res = {"scenario": spec["scenario"], "job": spec["job"], "guest": "busy" if spec["busy"] else "idle",
           "slot": slot, "kind": kind, "repeat": rep, "speed": spec["speed"], "cap": spec["cap"],
           "size": size}
    mode = None
    if spec["job"] == "mirror":
        mode = (ctx["light_modes"] if light else ctx["modes"])[slot]
        if mode == "auto" and kind == "qsd":
            res["mode_requested"] = "auto"
            mode = args.auto_fallback
        res["copy_mode"] = mode
    have = ctx["commands"].get(slot)
    missing = [c for c in JOB_COMMANDS.get(spec["job"], ()) if have is not None and c not in have]
    if missing:
        res["status"] = "unsupported"
        res["error"] = f"query-commands does not list {', '.join(missing)}"
        log(f"run {tag}: skipped, {res['error']}")
        return res
    d = Daemon(slot, kind, ctx["bins"][slot], ctx["work"], tag, args.cache == "direct", args.aio)
    fio = None
    res["loadavg_start"] = round(os.getloadavg()[0], 2)
    target = os.path.join(ctx["work"], f"{tag}-target.{args.target_format}")
    log(f"run {tag}" + (f" copy-mode={mode}" if mode else "") +
        (f" speed={spec['speed'] / MiB:.0f} MiB/s" if spec["speed"] else ""))
    try:
        d.start()
        d.blockdev_add("src", ctx["light_sources" if light else "sources"][slot], "raw")
        d.export("src")
        if spec["job"] != "none":
            subprocess.run(["qemu-img", "create", "-q", "-f", args.target_format, target, str(size)],
                           check=True, timeout=60)
            d.blockdev_add("tgt", target, args.target_format)
        if spec["busy"]:
            fio = Fio(args, d.nbd_path, ctx["work"], tag,
                      args.warmup + args.runtime + spec["cap"] + args.post + 40, light=light)
            fio.start()
            t_job = fio.t_launch + (2.0 if light else args.warmup + args.runtime)
            while time.time() < t_job:
                if not fio.alive():
                    raise RuntimeError(f"fio exited early: {fio.errors()}")
                time.sleep(min(0.1, max(0.0, t_job - time.time())))
        if spec["job"] == "none":
            t0 = time.time()
            time.sleep(args.runtime)
            jr = {"status": "finished", "t0": t0, "t_end": time.time(), "samples": [], "events": [],
                  "notes": [], "t_ready": None}
        else:
            job_args = {"job-id": JOB_ID, "device": "src", "target": "tgt", "sync": "full"}
            if spec["speed"]:
                job_args["speed"] = spec["speed"]
            if mode:
                job_args["copy-mode"] = mode
            job_args.update(ctx["job_args"].get(slot, {}))
            cmd = "blockdev-mirror" if spec["job"] == "mirror" else "blockdev-backup"
            res["command"] = {"execute": cmd, "arguments": job_args}
            cpu0 = cpu_seconds(d.proc.pid)
            jr = drive_job(d, spec["job"], spec["cap"], args.poll_interval, cmd, job_args)
            cpu1 = cpu_seconds(d.proc.pid)
            if cpu0 is not None and cpu1 is not None:
                res["daemon_cpu_s_during_job"] = round(cpu1 - cpu0, 2)
        if fio and light:
            light_writer(res, fio, jr, args)
        elif fio:
            end = time.time() + args.post
            while time.time() < end and fio.alive():
                time.sleep(0.05)
            if not fio.alive():
                res.setdefault("notes", []).append("fio ended before the post-job window: "
                                                    + fio.errors()[-300:])
            fio.stop()
            if jr.get("t_end"):
                guest(res, fio, jr, args)
        res.update({k: v for k, v in jr.items() if k not in ("t0", "t_end", "t_ready")})
        res.setdefault("notes", []).extend(jr.get("notes", []))
    except Exception as e:  # one broken run must not take the others down
        res["status"] = "error"
        res["error"] = f"{type(e).__name__}: {e}"
        tail = d.log_tail()
        if tail:
            res["daemon_log"] = tail
        log(f"  error: {res['error']}" + (f"\n  daemon log:\n{tail}" if tail else ""))
    finally:
        if fio:
            fio.stop()
        res["loadavg_end"] = round(os.getloadavg()[0], 2)
        note = d.stop()
        if note:
            res.setdefault("notes", []).append(f"daemon {note}")
        if os.path.exists(target):
            os.unlink(target)
        for f in glob.glob(os.path.join(ctx["work"], tag + "-fio*")):
            os.unlink(f)
    summary = f"  -> {res.get('status')}"
    if res.get("job_time") is not None:
        summary += f", job {res['job_time']:.2f} s"
    if res.get("ready_at") is not None:
        summary += f", READY at {res['ready_at']:.2f} s"
    if res.get("remaining_at_end") is not None and res.get("status") != "finished":
        summary += f", {res['remaining_at_end'] / MiB:.0f} MiB remaining"
    if res.get("guest_ratio") is not None:
        summary += (f", guest {res['before_MiBps']:.0f} -> {res['during_MiBps']:.0f} MiB/s "
                    f"(ratio {res['guest_ratio']:.2f}, longest stall {res['longest_stall_s']:.2f} s)")
    log(summary)
    return res


def light_writer(res, fio, jr, args):
    """Scenario d: lets fio finish its writes and its verify (bounded), then
    notes when it stopped writing and whether the verify passed."""
    limit = time.time() + (args.light_io or args.light_size) / parse_size(args.light_rate) + 60
    while fio.alive() and time.time() < limit:
        time.sleep(0.1)
    if fio.alive():
        res.setdefault("notes", []).append("fio still running after its writes + 60 s; stopped")
        fio.stop()
    res["fio_rc"] = fio.proc.returncode
    err = fio.errors()
    res["fio_ok"] = fio.proc.returncode == 0 and "verify" not in err.lower()
    if not res["fio_ok"]:
        res["fio_error"] = err[-500:]
    pts, _times = fio.curve()
    if pts and jr.get("t0"):
        # The last bandwidth-log window with bytes written: where the writes ended.
        last = max((t for (t, c), (_, c0) in zip(pts[1:], pts) if c > c0), default=pts[-1][0])
        res["writes_end_at"] = round(last - jr["t0"], 3)
        if jr.get("t_ready"):
            res["ready_while_writing"] = jr["t_ready"] < last - fio.avg
        during = rate(pts, jr["t0"], jr.get("t_ready") or jr["t_end"])
        res["during_MiBps"] = during / MiB if during is not None else None


def guest(res, fio, jr, args):
    """Guest throughput before the job, during it, and (mirror) before/after READY."""
    pts, times = fio.curve()
    if not pts:
        res["guest_error"] = "no fio bandwidth log: " + fio.errors()[-300:]
        return
    t0, t_end, t_ready = jr["t0"], jr["t_end"], jr.get("t_ready")
    b0 = max(fio.t_launch + args.warmup, pts[0][0] + 0.2)
    before, during = rate(pts, b0, t0), rate(pts, t0, t_end)
    res["before_window_s"] = round(t0 - b0, 2)
    res["during_window_s"] = round(t_end - t0, 2)
    res["before_MiBps"] = before / MiB if before is not None else None
    res["during_MiBps"] = during / MiB if during is not None else None
    res["guest_ratio"] = during / before if before and during is not None else None
    res["longest_stall_s"] = round(longest_gap(times, t0, t_end, fio.avg), 3)
    if t_ready:
        to_ready, after = rate(pts, t0, t_ready), rate(pts, t_ready, t_end)
        res["to_ready_MiBps"] = to_ready / MiB if to_ready is not None else None
        res["after_ready_MiBps"] = after / MiB if after is not None else None
    post = rate(pts, t_end, min(t_end + args.post, pts[-1][0]))
    res["after_job_MiBps"] = post / MiB if post is not None else None
    # Cross-check of the log arithmetic against fio's own byte count.
    total = fio.io_bytes()
    if total:
        res["log_vs_fio_bytes"] = round(pts[-1][1] / total, 3)
    # Throughput series on a 100 ms grid, seconds since job start (for later plots).
    step = args.log_msec / 1000.0
    series = []
    t = pts[0][0]
    while t + step <= pts[-1][0]:
        series.append([round(t - t0, 2), round((interp(pts, t + step) - interp(pts, t)) / step / MiB, 1)])
        t += step
    res["guest_series_MiBps"] = series


# ---------------------------------------------------------------- reporting

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=2, unit=""):
    return "–" if x is None else f"{x:.{nd}f}{unit}"


def publish(table, out):
    """Prints a markdown table, and writes it to `out` too when given (the benchmarks' --out)."""
    print(table)
    if out:
        with open(out, "w") as f:
            f.write(table + "\n")


def label(ctx, slot):
    if ctx["kinds"][slot] != slot:
        return f"{slot} (runs {ctx['kinds'][slot]})"
    return slot


def report(ctx, runs):
    args = ctx["args"]
    slots = ctx["slots"]
    groups = collections.OrderedDict()
    for r in runs:
        groups.setdefault((r["scenario"], r["job"], r["guest"], r["slot"]), []).append(r)

    def agg(key):
        rs = groups.get(key, [])
        if not rs:
            return None
        fin = [r for r in rs if r.get("status") == "finished"]
        statuses = collections.Counter(r.get("status") for r in rs)
        return {
            "n": len(rs), "finished": len(fin), "statuses": dict(statuses),
            "mode": next((r.get("copy_mode") for r in rs if r.get("copy_mode")), None),
            "mode_requested": next((r.get("mode_requested") for r in rs if r.get("mode_requested")), None),
            "job_time": med(r.get("job_time") for r in fin),
            "ready_at": med(r.get("ready_at") for r in rs),
            "ready_n": sum(1 for r in rs if r.get("ready_at") is not None),
            "copied_MiB": med((r.get("offset") or 0) / MiB if r.get("offset") is not None else None for r in rs),
            "remaining_MiB": med(r["remaining_at_end"] / MiB if r.get("remaining_at_end") is not None
                                 and r.get("status") != "finished" else None for r in rs),
            "before": med(r.get("before_MiBps") for r in rs),
            "during": med(r.get("during_MiBps") for r in rs),
            "ratio": med(r.get("guest_ratio") for r in rs),
            "stall": max((r["longest_stall_s"] for r in rs if r.get("longest_stall_s") is not None),
                         default=None),
            # A job shorter than a few fio log windows gives a coarse ratio.
            "short": any((r.get("during_window_s") or 99) < 5 * args.log_msec / 1000.0 for r in rs),
            "to_ready": med(r.get("to_ready_MiBps") for r in rs),
            "after_ready": med(r.get("after_ready_MiBps") for r in rs),
            "errors": [r.get("error") for r in rs if r.get("error")],
        }

    def fin_cell(a):
        if a["finished"] == a["n"]:
            return "yes"
        other = ", ".join(f"{k} {v}" for k, v in a["statuses"].items() if k != "finished")
        return f"{a['finished']}/{a['n']} ({other})"

    def mode_cell(a):
        if not a["mode"]:
            return "–"
        if a["mode_requested"] and a["mode_requested"] != a["mode"]:
            return f"{a['mode']} (for {a['mode_requested']})"
        return a["mode"]

    out = []
    out.append(f"Machine: {platform.node()}, {os.cpu_count()} cores, {platform.platform()}; "
               f"{ctx['fio_version']}; " + "; ".join(f"{label(ctx, s)}: {ctx['versions'][s]}" for s in slots))
    out.append(f"Source {args.size / MiB:.0f} MiB raw of random data, cache.direct={'on' if args.cache == 'direct' else 'off'}, "
               f"target {args.target_format}; guest: fio nbd randwrite bssplit={args.bssplit} "
               f"iodepth={args.iodepth} numjobs={args.numjobs}; {args.runtime:g} s baseline before each job "
               f"(after {args.warmup:g} s warm-up); cap {args.cap:g} s (a); repeat {args.repeat} "
               f"(medians; 'finished' counts runs).")
    out.append("")

    def row_busy(job, scen, guest_kind):
        for s in slots:
            a = agg((scen, job, guest_kind, s))
            if a:
                yield s, a

    if "a" in ctx["scenarios"]:
        out.append("### (a) No speed limit, busy guest")
        out.append("")
        out.append("| job | daemon | copy mode | finished | job time s | READY at s | copied MiB | "
                   "guest before MiB/s | during MiB/s | guest ratio | ≥ 0.8 | longest stall s |")
        out.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
        for job in ("backup", "mirror"):
            for s, a in row_busy(job, "a", "busy"):
                out.append(f"| {job} | {label(ctx, s)} | {mode_cell(a)} | {fin_cell(a)} | {fmt(a['job_time'])} | "
                           f"{fmt(a['ready_at'])} | {fmt(a['copied_MiB'], 0)} | {fmt(a['before'], 0)} | "
                           f"{fmt(a['during'], 0)} | {rcell(a)} | {ok(a['ratio'])} | {fmt(a['stall'])} |")
        out.append("")
        out.append("### (a) No speed limit, idle guest")
        out.append("")
        out.append("| job | daemon | copy mode | finished | job time s | READY at s | copied MiB |")
        out.append("|---|---|---|---|---:|---:|---:|")
        for job in ("backup", "mirror"):
            for s, a in row_busy(job, "a", "idle"):
                out.append(f"| {job} | {label(ctx, s)} | {mode_cell(a)} | {fin_cell(a)} | {fmt(a['job_time'])} | "
                           f"{fmt(a['ready_at'])} | {fmt(a['copied_MiB'], 0)} |")
        out.append("")

    if "b" in ctx["scenarios"]:
        sp = ctx["speed"]
        ideal = args.size / sp
        out.append(f"### (b) Mirror with speed={sp / MiB:.1f} MiB/s, busy guest "
                   f"(size/speed {ideal:.1f} s; target: done within {args.finish_factor:g} × = "
                   f"{args.finish_factor * ideal:.1f} s; cap {args.cap_factor:g} × = {args.cap_factor * ideal:.1f} s)")
        out.append("")
        out.append("| daemon | copy mode | READY reached | READY at s | completed at s | within "
                   f"{args.finish_factor:g}× | job time / (size/speed) | remaining at cap MiB | copied MiB | "
                   "guest before MiB/s | during MiB/s | guest ratio | ≥ 0.8 |")
        out.append("|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|")
        for s, a in row_busy("mirror", "b", "busy"):
            rs = groups[("b", "mirror", "busy", s)]
            within = sum(1 for r in rs if r.get("job_time") is not None
                         and r["job_time"] <= args.finish_factor * ideal)
            out.append(f"| {label(ctx, s)} | {mode_cell(a)} | {a['ready_n']}/{a['n']} | {fmt(a['ready_at'])} | "
                       f"{fmt(a['job_time'])} | {within}/{a['n']} | "
                       f"{fmt(a['job_time'] / ideal if a['job_time'] else None)} | {fmt(a['remaining_MiB'], 0)} | "
                       f"{fmt(a['copied_MiB'], 0)} | {fmt(a['before'], 0)} | {fmt(a['during'], 0)} | "
                       f"{rcell(a)} | {ok(a['ratio'])} |")
        out.append("")

    if "d" in ctx["scenarios"]:
        out.append(f"### (d) Mirror under a light writer ({args.light_size / MiB:.0f} MiB export, fio 4 KiB "
                   f"random writes at {args.light_rate}/s, QD1, verify=crc32c, "
                   f"{(args.light_io or args.light_size) / MiB:.0f} MiB written)")
        out.append("")
        out.append("| daemon | copy mode | READY at s | writer still writing at READY | writes ended at s | "
                   "job time s | fio verify | writer MiB/s until READY |")
        out.append("|---|---|---:|---|---:|---:|---|---:|")
        for s, a in row_busy("mirror", "d", "busy"):
            rs = groups[("d", "mirror", "busy", s)]
            writing = sum(1 for r in rs if r.get("ready_while_writing"))
            verified = sum(1 for r in rs if r.get("fio_ok"))
            out.append(f"| {label(ctx, s)} | {mode_cell(a)} | {fmt(a['ready_at'])} | {writing}/{a['n']} | "
                       f"{fmt(med(r.get('writes_end_at') for r in rs))} | {fmt(a['job_time'])} | "
                       f"{verified}/{a['n']} ok | {fmt(a['during'], 1)} |")
        q, l = agg(("d", "mirror", "busy", "qsd")), agg(("d", "mirror", "busy", "livesnapd"))
        if q and l and q["ready_at"] and l["ready_at"]:
            r = l["ready_at"] / q["ready_at"]
            out.append("")
            out.append(f"READY time livesnapd / qsd: {r:.2f} (target ≤ {LIGHT_READY_TARGET:g}: "
                       f"{'yes' if r <= LIGHT_READY_TARGET else '**no**'})")
        out.append("")

    out.append("### (c) Guest write throughput during the job / before it (every busy run)")
    out.append("")
    out.append("| scenario | job | daemon | before MiB/s | during MiB/s | ratio | ≥ 0.8 | until READY MiB/s | "
               "after READY MiB/s | longest stall s |")
    out.append("|---|---|---|---:|---:|---:|---|---:|---:|---:|")
    for (scen, job, guest_kind, s) in groups:
        if guest_kind != "busy" or scen == "d":
            continue
        a = agg((scen, job, guest_kind, s))
        name = "no job (control)" if job == "none" else job
        out.append(f"| {scen} | {name} | {label(ctx, s)} | {fmt(a['before'], 0)} | {fmt(a['during'], 0)} | "
                   f"{rcell(a)} | {ok(a['ratio'])} | {fmt(a['to_ready'], 0)} | {fmt(a['after_ready'], 0)} | "
                   f"{fmt(a['stall'])} |")
    out.append("")

    compared = [s for s in ("livesnapd", "pre-issue") if s in slots]
    if compared and "qsd" in slots:
        out.append("### livesnapd (and the pre-issue build) / qsd")
        out.append("")
        out.append("Guest time lost = job time × (1 − guest ratio): the seconds of writing the guest "
                   "gave up to the job.")
        out.append("")
        out.append("| scenario | job | guest | daemon | job time ratio (lower is better) | "
                   "guest ratio ratio (higher is better) | guest time lost s (daemon / qsd) |")
        out.append("|---|---|---|---|---:|---:|---:|")

        def lost(a):
            if a["job_time"] is None or a["ratio"] is None:
                return None
            return a["job_time"] * max(0.0, 1.0 - a["ratio"])

        seen = set()
        for (scen, job, guest_kind, _s) in groups:
            if (scen, job, guest_kind) in seen or job == "none":
                continue
            seen.add((scen, job, guest_kind))
            q = agg((scen, job, guest_kind, "qsd"))
            for s in compared:
                l = agg((scen, job, guest_kind, s))
                if not q or not l:
                    continue
                tr = l["job_time"] / q["job_time"] if l["job_time"] and q["job_time"] else None
                if tr is None:
                    tr_cell = "; ".join(f"{n}: {', '.join(a['statuses'])}" for n, a in (("qsd", q), (s, l))
                                        if not a["job_time"]) or "–"
                else:
                    tr_cell = fmt(tr)
                gr = l["ratio"] / q["ratio"] if l["ratio"] and q["ratio"] else None
                lq, ll = lost(q), lost(l)
                lost_cell = f"{fmt(ll)} / {fmt(lq)}" if lq is not None and ll is not None else "–"
                out.append(f"| {scen} | {job} | {guest_kind} | {label(ctx, s)} | {tr_cell} | {fmt(gr)} | "
                           f"{lost_cell} |")
        out.append("")

    loads = [r[k] for r in runs for k in ("loadavg_start", "loadavg_end") if r.get(k) is not None]
    controls = [r["guest_ratio"] for r in runs if r["job"] == "none" and r.get("guest_ratio") is not None]
    noisy = []
    if loads and max(loads) > (os.cpu_count() or 1):
        noisy.append(f"the 1-minute load average reached {max(loads):.1f} on {os.cpu_count()} cores")
    if controls and max(abs(c - 1) for c in controls) > 0.1:
        noisy.append("the no-job control ratio was " + ", ".join(f"{c:.2f}" for c in controls)
                     + " (should be about 1.0)")
    if noisy:
        out.append("**Noisy machine**: " + "; ".join(noisy) + ". Guest ratios are not trustworthy; rerun when "
                   "nothing else is running.")
        out.append("")
    if any(agg(k)["short"] for k in groups if k[2] == "busy"):
        out.append(f"† the job lasted less than {5 * args.log_msec / 1000.0:g} s (five fio log windows): "
                   "that ratio is coarse; use a larger --size.")
        out.append("")
    errs = [(r["scenario"], r["job"], r["guest"], r["slot"], r.get("error")) for r in runs
            if r.get("status") in ("error", "unsupported", "failed", "daemon-died", "cancel-hung")]
    if errs:
        out.append("Problems:")
        for e in errs:
            out.append(f"- {e[0]} {e[1]} {e[2]} {e[3]}: {e[4]}")
        out.append("")
    return "\n".join(out)


def rcell(a):
    return fmt(a["ratio"]) + (" †" if a["short"] and a["ratio"] is not None else "")


def ok(ratio):
    if ratio is None:
        return "–"
    return "yes" if ratio >= GUEST_TARGET else "**no**"


def plot(ctx, runs, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing (apt-get install -y python3-matplotlib; run with /usr/bin/python3): no PNG")
        return False
    args = ctx["args"]
    rs = [r for r in runs if r["scenario"] == "b" and r.get("samples")]
    if not rs:
        log("no scenario-b samples: no PNG")
        return False
    ideal = args.size / ctx["speed"]
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    colours = {"qsd": "tab:red", "livesnapd": "tab:blue", "pre-issue": "tab:gray"}
    labelled = set()
    for r in rs:
        s = r["slot"]
        col = colours.get(s, "tab:grey")
        xs = [p[0] for p in r["samples"]]
        ys = [p[1] / MiB for p in r["samples"]]
        name = f"{label(ctx, s)}, {r.get('copy_mode')}"
        if r.get("mode_requested") and r["mode_requested"] != r.get("copy_mode"):
            name += f" (for {r['mode_requested']})"
        ax.plot(xs, ys, color=col, lw=1.4, alpha=0.9 if r["repeat"] == 0 else 0.45,
                label=name if s not in labelled else None)
        labelled.add(s)
        if r.get("ready_at") is not None:
            y = interp_samples(r["samples"], r["ready_at"])
            ax.plot([r["ready_at"]], [y], "o", color=col, ms=9, mfc="none", mew=1.5, zorder=5,
                    label="READY" if "READY" not in labelled else None)
            labelled.add("READY")
        if r.get("status") == "finished" and r.get("end_at") is not None:
            ax.plot([r["end_at"]], [0], "*", color=col, ms=12,
                    label="COMPLETED" if "COMPLETED" not in labelled else None)
            labelled.add("COMPLETED")
        elif r.get("cancel_at") is not None:
            y = interp_samples(r["samples"], r["cancel_at"])
            ax.plot([r["cancel_at"]], [y], "x", color=col, ms=10, mew=2,
                    label="cap: force cancel" if "cancel" not in labelled else None)
            labelled.add("cancel")
    ax.axvline(ideal, color="black", ls=":", lw=1, label="size/speed")
    ax.axvline(args.finish_factor * ideal, color="green", ls="--", lw=1, label=f"{args.finish_factor:g} × size/speed")
    ax.set_xlabel("seconds since job start")
    ax.set_ylabel("MiB remaining (len − offset)")
    ax.set_xlim(left=0)
    finish_plot(plt, fig, ax, path,
                f"blockdev-mirror sync=full, speed {ctx['speed'] / MiB:.1f} MiB/s, {args.size / MiB:.0f} MiB, "
                f"cache.direct={'on' if args.cache == 'direct' else 'off'}, busy guest (fio randwrite QD{args.iodepth})")
    return True


def finish_plot(plt, fig, ax, path, title):
    """What every plot ends with: grid, title, legend, saved to path."""
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_guest(ctx, runs, path):
    """The guest's write throughput over time during scenario a's busy
    backup, one line per daemon and repeat, the job's end marked."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing (apt-get install -y python3-matplotlib; run with /usr/bin/python3): no guest PNG")
        return False
    args = ctx["args"]
    rs = [r for r in runs if r["scenario"] == "a" and r["job"] == "backup" and r["guest"] == "busy"
          and r.get("guest_series_MiBps")]
    if not rs:
        log("no busy backup series: no guest PNG")
        return False
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    colours = {"qsd": "tab:red", "livesnapd": "tab:blue", "pre-issue": "tab:gray"}
    for r in rs:
        col = colours.get(r["slot"], "tab:grey")
        xs = [p[0] for p in r["guest_series_MiBps"]]
        ys = [p[1] for p in r["guest_series_MiBps"]]
        name = f"{label(ctx, r['slot'])}" + (f" #{r['repeat'] + 1}" if args.repeat > 1 else "")
        if r.get("job_time") is not None:
            name += f": job {r['job_time']:.1f} s, guest ratio {r.get('guest_ratio') or 0:.2f}"
        ax.plot(xs, ys, color=col, lw=1.2, alpha=0.9 if r["repeat"] == 0 else 0.45, label=name)
        if r.get("end_at") is not None:
            ax.axvline(r["end_at"], color=col, ls="--", lw=1, alpha=0.8)
    ax.axvline(0, color="black", ls=":", lw=1, label="job start (dashed: job end)")
    ax.set_xlabel("seconds since job start")
    ax.set_ylabel("guest writes, MiB/s (fio bandwidth log)")
    finish_plot(plt, fig, ax, path,
                f"guest throughput during blockdev-backup sync=full, {args.size / MiB:.0f} MiB, "
                f"cache.direct={'on' if args.cache == 'direct' else 'off'}, fio randwrite QD{args.iodepth}")
    return True


def interp_samples(samples, t):
    pts = [(p[0], p[1] / MiB) for p in samples]
    if not pts:
        return 0
    return interp(pts, t)


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--scenarios", default="a,b,c")
    ap.add_argument("--daemons", default="livesnapd,qsd", help="slots to run, in this order on the first repeat")
    ap.add_argument("--livesnapd-bin", default=os.path.join(ROOT, "target/release/livesnapd"))
    ap.add_argument("--qsd-bin", default="qemu-storage-daemon")
    ap.add_argument("--before-bin", default=None,
                    help="an earlier livesnapd build, run as a third slot 'pre-issue' (add it to --daemons)")
    ap.add_argument("--livesnapd-as-qsd", action="store_true",
                    help="the livesnapd slot runs qsd too (validates this script before livesnapd has jobs)")
    ap.add_argument("--size", default="1G", help="source image size (suffixes K, M, G)")
    ap.add_argument("--cache", choices=("direct", "writeback"), default="direct")
    ap.add_argument("--aio", default=None, help="file driver aio= (default: the daemon's default, threads)")
    ap.add_argument("--target-format", choices=("raw", "qcow2"), default="raw")
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds of guest baseline before each job")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of writes before the baseline counts")
    ap.add_argument("--post", type=float, default=1.0, help="seconds the guest keeps writing after the job")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cap", type=float, default=60.0, help="scenario a: seconds before a job counts as not finishing")
    ap.add_argument("--speed", default=None, help="scenario b: job speed in bytes/s (default size/12 s)")
    ap.add_argument("--cap-factor", type=float, default=3.0, help="scenario b: cap = this × size/speed")
    ap.add_argument("--finish-factor", type=float, default=1.2, help="scenario b: target = this × size/speed")
    ap.add_argument("--mirror-modes", default="qsd=background,livesnapd=auto",
                    help="copy-mode per slot for blockdev-mirror (a and b)")
    ap.add_argument("--auto-fallback", default="write-blocking", choices=("background", "write-blocking"),
                    help="copy-mode used instead of 'auto' when the slot runs qsd")
    ap.add_argument("--job-args", action="append", default=[],
                    help="SLOT=JSON: extra arguments for that slot's job commands (repeatable)")
    ap.add_argument("--iodepth", type=int, default=16)
    ap.add_argument("--numjobs", type=int, default=1)
    ap.add_argument("--bssplit", default="4k/40:8k/10:16k/20:32k/10:64k/20")
    ap.add_argument("--log-msec", type=int, default=100, help="fio bandwidth log window")
    ap.add_argument("--poll-interval", type=float, default=0.1, help="query-block-jobs period")
    ap.add_argument("--workdir", default=None, help="parent of the temporary directory (default $TMPDIR)")
    ap.add_argument("--json", default="/tmp/livesnap-bench-jobs.json")
    ap.add_argument("--keep-logs", default=None,
                    help="copy the daemons' logs here (livesnapd logs what LIVESNAP_LOG asks)")
    ap.add_argument("--out", default=None, help="also write the markdown tables here")
    ap.add_argument("--png", default=os.path.join(ROOT, "docs/bench-mirror-speed-limit.png"))
    ap.add_argument("--guest-png", default=os.path.join(ROOT, "docs/bench-guest-backup.png"),
                    help="guest throughput over time during scenario a's busy backup")
    ap.add_argument("--light-size", default="64M", help="scenario d: export size")
    ap.add_argument("--light-rate", default="4m", help="scenario d: fio rate (fio's syntax)")
    ap.add_argument("--light-io", default=None, help="scenario d: bytes fio writes (default: the export once)")
    ap.add_argument("--light-modes", default="qsd=background,livesnapd=background",
                    help="scenario d: copy-mode per slot")
    args = ap.parse_args()
    args.size = parse_size(args.size)
    args.light_size = parse_size(args.light_size)
    args.light_io = parse_size(args.light_io) if args.light_io else None
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    slots = [s.strip() for s in args.daemons.split(",") if s.strip()]
    for s in slots:
        if s not in ("livesnapd", "qsd", "pre-issue"):
            sys.exit(f"unknown daemon {s!r} (livesnapd, qsd, pre-issue)")
        if s == "pre-issue" and not args.before_bin:
            sys.exit("the 'pre-issue' slot needs --before-bin")
    for s in scenarios:
        if s not in ("a", "b", "c", "d"):
            sys.exit(f"unknown scenario {s!r} (a, b, c, d)")
    modes = dict(kv.split("=", 1) for kv in args.mirror_modes.split(",") if kv)
    light_modes = dict(kv.split("=", 1) for kv in args.light_modes.split(",") if kv)
    # The earlier build runs with livesnapd's modes unless told otherwise.
    modes.setdefault("pre-issue", modes.get("livesnapd", "background"))
    light_modes.setdefault("pre-issue", light_modes.get("livesnapd", "background"))
    job_args = {}
    for kv in args.job_args:
        slot, js = kv.split("=", 1)
        job_args[slot] = json.loads(js)
    speed = parse_size(args.speed) if args.speed else max(MiB, (args.size // 12) // MiB * MiB)

    for tool in ("fio", "qemu-img"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: apt-get install -y fio qemu-utils")
    kinds = {"qsd": "qsd", "livesnapd": "qsd" if args.livesnapd_as_qsd else "livesnapd"}
    bins = {"qsd": args.qsd_bin, "livesnapd": args.qsd_bin if args.livesnapd_as_qsd else args.livesnapd_bin}
    if args.before_bin:
        kinds["pre-issue"], bins["pre-issue"] = "livesnapd", args.before_bin
    for s in slots:
        if not shutil.which(bins[s]) and not os.access(bins[s], os.X_OK):
            hint = ("CARGO_TARGET_DIR=target cargo build --release -p livesnapd" if kinds[s] == "livesnapd"
                    else "apt-get install -y qemu-utils")
            sys.exit(f"{bins[s]} not found: {hint} (or --livesnapd-as-qsd to validate with qsd)")

    specs = []
    if "a" in scenarios:
        for job in ("backup", "mirror"):
            specs.append({"scenario": "a", "job": job, "busy": True, "speed": 0, "cap": args.cap})
        for job in ("backup", "mirror"):
            specs.append({"scenario": "a", "job": job, "busy": False, "speed": 0, "cap": args.cap})
    if "b" in scenarios:
        specs.append({"scenario": "b", "job": "mirror", "busy": True, "speed": speed,
                      "cap": args.cap_factor * args.size / speed})
    if "c" in scenarios:
        specs.append({"scenario": "c", "job": "none", "busy": True, "speed": 0, "cap": 0})
    if "d" in scenarios:
        specs.append({"scenario": "d", "job": "mirror", "busy": True, "speed": 0, "cap": args.cap})

    # Termination signals unwind through the finally blocks (daemons killed, tmp removed).
    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    work = tempfile.mkdtemp(prefix="livesnap-bench-jobs-", dir=args.workdir)
    ctx = {"args": args, "scenarios": scenarios, "slots": slots, "kinds": kinds, "bins": bins,
           "modes": modes, "light_modes": light_modes, "job_args": job_args, "speed": speed, "work": work,
           "versions": {s: daemon_version(kinds[s], bins[s]) for s in slots},
           "fio_version": subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip()}
    runs = []
    ctx["commands"] = {}
    interrupted = None
    try:
        # Fully written with random data, so neither daemon can skip holes or zeroes.
        pristine = os.path.join(work, "pristine.img")
        log(f"writing {args.size / MiB:.0f} MiB of random data to {pristine}")
        subprocess.run(["dd", "if=/dev/urandom", f"of={pristine}", "bs=1M", f"count={args.size // MiB}",
                        "iflag=fullblock", "status=none"], check=True, timeout=600)
        ctx["sources"] = {}
        for s in slots:
            ctx["sources"][s] = os.path.join(work, f"source-{s}.img")
            shutil.copyfile(pristine, ctx["sources"][s])
        os.unlink(pristine)
        if "d" in scenarios:
            ctx["light_sources"] = {}
            for s in slots:
                ctx["light_sources"][s] = os.path.join(work, f"light-{s}.img")
                subprocess.run(["dd", "if=/dev/urandom", f"of={ctx['light_sources'][s]}", "bs=1M",
                                f"count={args.light_size // MiB}", "iflag=fullblock", "status=none"],
                               check=True, timeout=600)
        ctx["commands"] = {s: probe_commands(ctx, s) for s in slots}
        for rep in range(args.repeat):
            for spec in specs:
                order = slots if rep % 2 == 0 else list(reversed(slots))
                for s in order:
                    runs.append(run_one(ctx, spec, s, rep))
    except KeyboardInterrupt as e:
        interrupted = str(e) or "interrupted"
        log(f"interrupted ({interrupted}); reporting what ran")
    finally:
        if args.keep_logs:
            os.makedirs(args.keep_logs, exist_ok=True)
            for f in glob.glob(os.path.join(work, "*.log")):
                shutil.copy(f, args.keep_logs)
        shutil.rmtree(work, ignore_errors=True)

    table = report(ctx, runs)
    publish(table, args.out)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.node(), "cores": os.cpu_count(),
            "platform": platform.platform(), "fio": ctx["fio_version"], "versions": ctx["versions"],
            "kinds": kinds, "bins": bins,
            "job_commands": {s: (None if ctx["commands"].get(s) is None else
                                 sorted(c for c in ctx["commands"][s] if "job" in c or c.startswith("blockdev-")))
                             for s in slots},
            "args": {k: v for k, v in vars(args).items()}, "speed": speed,
            "interrupted": interrupted}
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "runs": runs, "markdown": table}, f, indent=1)
    log(f"results: {args.json}")
    if "b" in scenarios and plot(ctx, runs, args.png):
        log(f"plot: {args.png}")
    if "a" in scenarios and plot_guest(ctx, runs, args.guest_png):
        log(f"guest plot: {args.guest_png}")
    if interrupted:
        sys.exit(130)


if __name__ == "__main__":
    main()
