#!/usr/bin/env python3
"""Seeds for the NBD fuzz targets, recorded from real clients (nbdinfo,
qemu-img, qemu-io) talking to livesnapd through a recording proxy.

nbd_options gets each connection's whole client stream; nbd_requests gets
what the client sent after its option haggling (the harness negotiates on
its own). The export is named "fuzz" like the harness's.
Usage: nbd_seeds.py LIVESNAPD OPTIONS_DIR REQUESTS_DIR"""
import hashlib
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

MAX_SEED = 16384
IHAVEOPT = 0x49484156454F5054
OPT_EXPORT_NAME, OPT_GO = 1, 7


def after_options(stream):
    """Offset just past the option that ends haggling, or None."""
    at = 4
    while at + 16 <= len(stream):
        magic, opt, length = struct.unpack_from(">QII", stream, at)
        if magic != IHAVEOPT:
            return None
        at += 16 + length
        if opt in (OPT_EXPORT_NAME, OPT_GO):
            return at
    return None


def pump(src, dst, record):
    while True:
        try:
            data = src.recv(65536)
            if not data:
                break
            if record is not None:
                record.append(data)
            dst.sendall(data)
        except OSError:
            break
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def proxy(listener, target, streams):
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        server = socket.socket(socket.AF_UNIX)
        server.connect(target)
        record = []
        streams.append(record)
        threading.Thread(target=pump, args=(client, server, record), daemon=True).start()
        threading.Thread(target=pump, args=(server, client, None), daemon=True).start()


def main():
    livesnapd, options_dir, requests_dir = sys.argv[1:4]
    tmp = tempfile.mkdtemp()
    img = os.path.join(tmp, "disk.img")
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    nbd_sock, proxy_sock = os.path.join(tmp, "nbd.sock"), os.path.join(tmp, "proxy.sock")
    d = subprocess.Popen([livesnapd, "--image", img, "--format", "raw", "--export-name", "fuzz",
                          "--nbd", "unix:" + nbd_sock, "--qmp", os.path.join(tmp, "qmp.sock")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if os.path.exists(nbd_sock):
                break
            time.sleep(0.05)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(proxy_sock)
        listener.listen(8)
        streams = []
        threading.Thread(target=proxy, args=(listener, nbd_sock, streams), daemon=True).start()
        url = f"nbd+unix:///fuzz?socket={proxy_sock}"
        qemu = f"nbd:unix:{proxy_sock}:exportname=fuzz"
        runs = [
            ["nbdinfo", url],
            ["nbdinfo", "--list", f"nbd+unix://?socket={proxy_sock}"],
            ["nbdinfo", "--map", url],
            ["nbdinfo", "--map=qemu:allocation-depth", url],
            ["qemu-img", "info", qemu],
            ["qemu-img", "map", "--output=json", "-f", "raw", qemu],
            ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 4096 4096", "-c", "read -P 0x5a 4096 4096",
             "-c", "write -z 65536 65536", "-c", "discard 131072 65536", "-c", "flush",
             "-c", "write -F 0 512", qemu],
            ["qemu-io", "-f", "raw", "-r", "-c", "readv 0 512 512", "-c", "read 1048064 512", qemu],
        ]
        for cmd in runs:
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        time.sleep(0.5)
        n = 0
        for record in streams:
            stream = b"".join(record)
            seeds = [(options_dir, stream)]
            at = after_options(stream)
            if at is not None and at < len(stream):
                seeds.append((requests_dir, stream[at:]))
            for out, data in seeds:
                if len(data) > MAX_SEED:
                    data = data[:MAX_SEED]
                os.makedirs(out, exist_ok=True)
                with open(os.path.join(out, hashlib.sha1(data).hexdigest()[:16]), "wb") as f:
                    f.write(data)
                n += 1
        print(f"{len(streams)} NBD connections recorded, {n} seeds")
    finally:
        d.terminate()
        d.wait()


main()
