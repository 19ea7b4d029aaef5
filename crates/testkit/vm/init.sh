#!/bin/sh
# Guest init for tests/vm_snapshot.rs (packed by tests/harness/vm.rs).
#
# Writes request n = 0, 1, 2, ... as one 4 KiB O_DIRECT write of record n to
# record block b = n mod $lsblocks, at 4 KiB unit $lsbase + b * $lsstride of /dev/vda,
# strictly one at a time, so the disk after request N is known exactly: block
# b holds the last n <= N with n mod $lsblocks = b (zeros before its first
# write), and nothing else is ever written. After each write returns it
# reports "livesnap-guest: wrote n" through /dev/kmsg: printk reaches the
# serial port before the write(2) to /dev/kmsg returns, so when the host sees
# "wrote k" request k is on the disk and k + 2 has not been sent yet.
#
# Kernel arguments (handed to init as environment variables):
#   lstag     run tag (decimal, < 2^32) written into every record
#   lsblocks  number of 4 KiB blocks the records cycle through
#   lsbase    4 KiB unit of record block 0 (what lies before is not the guest's)
#   lsstride  distance between record blocks, in 4 KiB units
#   lsmax     stop after this many requests and power off (0: until powered off)

export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp

say() {
	echo "<2>livesnap-guest: $*" >/dev/kmsg
}

die() {
	say "FAILED: $*"
	poweroff -f
}

# One module per line, dependencies first (the harness orders them from each
# module's modinfo "depends=").
while read -r m; do
	insmod "/lib/modules/$m.ko" || die "insmod $m"
done </lib/modules/order

i=0
while [ ! -b /dev/vda ]; do
	i=$((i + 1))
	[ $i -gt 200 ] && die "no /dev/vda"
	sleep 0.05
done

tag=${lstag:-0}
blocks=${lsblocks:-64}
base=${lsbase:-0}
stride=${lsstride:-1}
max=${lsmax:-0}
# A 64-byte line, 64 times per 4 KiB block: magic, tag, n, block, and a
# pattern of all three (tests/harness/vm.rs GuestOpts::record).
fmt='LSNPVM01 %08x n=%010d b=%06d p=%08x ............\n'
say "ready tag=$tag blocks=$blocks base=$base stride=$stride max=$max"

n=0
while [ "$max" -eq 0 ] || [ $n -lt "$max" ]; do
	b=$((n % blocks))
	p=$(((n * 2654435761 ^ b * 40503 ^ tag) & 4294967295))
	a="$tag $n $b $p"
	a="$a $a"; a="$a $a"; a="$a $a"; a="$a $a"; a="$a $a"; a="$a $a"
	# shellcheck disable=SC2086 # the 256 words are the point
	printf "$fmt" $a >/tmp/rec
	dd if=/tmp/rec of=/dev/vda bs=4096 count=1 seek=$((base + b * stride)) oflag=direct conv=notrunc 2>/tmp/dd.err ||
		die "dd request $n: $(cat /tmp/dd.err)"
	say "wrote $n"
	n=$((n + 1))
done
say "done $n"
poweroff -f
