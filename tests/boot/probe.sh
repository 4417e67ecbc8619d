#!/bin/sh
# vfio-early boot-test probe. Installed into test images as
# /usr/local/sbin/vfio-early-probe and started by vfio-early-probe.service once the
# guest is up (the fast tier's /init runs it too). It prints what the harness asserts
# on the serial console, every line prefixed with "@@ " so kernel messages in between
# cannot be mistaken for it, then powers the guest off. Only the image's own userland
# is used (coreutils, sed, grep; busybox in the fast tier).
#
# Flags in /etc/vfio-early-probe/ (written by the harness):
#   apply-in-guest  run `vfio-early apply` first and list what it left behind
#   binder-only     only what the early binder decides (no list, no status)
#   status-text     also the human `vfio-early status` (the JSON one always runs)
#   list            also `vfio-early list`
#   full-kmsg       the whole kernel log, not only the lines the checks read (to see
#                   where a boot's time goes)
#   paths           one path a line: each reported as present or absent
#   stage-N.sh      the actions of a multi-boot scenario's stage N, run at the end of
#                   boot N (after the report); then the command line, kernel and
#                   initramfs the next boot gets from grub.cfg's default entry are
#                   written (tar) to the harness's transfer disk, where there is one
# The boots are counted in /var/lib/vfio-early-probe/boots.
# The kernel log gets "vfio-early-probe: start" and "... end" marks, so the harness can
# time the boot's phases; the kmsg section comes last to carry both.

flags=/etc/vfio-early-probe
state=/var/lib/vfio-early-probe
[ -d "$state" ] || mkdir -p "$state"
boots=0
[ -e "$state/boots" ] && read -r boots < "$state/boots"
boot=$((boots + 1))
echo "$boot" > "$state/boots"
# At error level, so the kernel also prints it on the console: its host arrival time
# places the kernel's clock on the host's.
echo "<3>vfio-early-probe: start" > /dev/kmsg

section() { echo "== $1"; }

report() {
    section cmdline
    read -r cmdline < /proc/cmdline
    echo "$cmdline"

    # What booted: the firmware, and the loader entry systemd-boot started (its EFI
    # variable: a 4-byte attribute header, then the name in UTF-16LE; sent as hex, the
    # harness decodes it).
    section firmware
    if [ -d /sys/firmware/efi ]; then echo uefi; else echo bios; fi
    entry=/sys/firmware/efi/efivars/LoaderEntrySelected-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f
    if [ -e "$entry" ]; then
        echo "loader-entry-selected $(od -An -v -tx1 "$entry" | tr -d ' \n')"
    fi

    # Shell builtins only (`cd -P` resolves the driver link): under TCG each command
    # started is tens of milliseconds.
    section drivers
    for dev in /sys/bus/pci/devices/*; do
        drv=none
        if [ -e "$dev/driver" ] && cd -P "$dev/driver"; then
            drv=${PWD##*/}
            cd /
        fi
        read -r vendor < "$dev/vendor"
        read -r device < "$dev/device"
        echo "${dev##*/} $vendor $device $drv"
    done

    section modules
    while read -r name _; do echo "$name"; done < /proc/modules

    section vfio-dev
    ls /dev/vfio 2>&1

    section boot
    echo "$boot"

    section kernels
    read -r release < /proc/sys/kernel/osrelease
    echo "$release"
    for k in /boot/vmlinuz-*; do echo "${k#/boot/vmlinuz-}"; done | sort -V

    if [ -e "$flags/paths" ]; then
        section paths
        while read -r p; do
            if [ -e "$p" ]; then echo "present $p"; else echo "absent $p"; fi
        done < "$flags/paths"
    fi

    if [ -e "$flags/apply-in-guest" ]; then
        section guest-apply
        vfio-early apply 2>&1
        echo "exit=$?"
        section guest-files
        ls /etc/modprobe.d/vfio-early.conf /etc/default/grub.d/vfio-early.cfg \
            /var/lib/vfio-early/manifest.json 2>&1
    fi

    if [ ! -e "$flags/binder-only" ]; then
        if [ -e "$flags/list" ]; then
            section list
            vfio-early list 2>&1
            echo "exit=$?"
        fi
        if [ -e "$flags/status-text" ]; then
            section status
            vfio-early status 2>&1
            echo "exit=$?"
        fi
        section status-json
        vfio-early status --json 2>&1
        echo "exit=$?"
    fi

    if [ -e "$flags/stage-$boot.sh" ]; then
        sh "$flags/stage-$boot.sh"
        section next-boot
        next_boot
    fi

    echo "vfio-early-probe: end" > /dev/kmsg
    section kmsg
    # Our lines, the IOMMU's, and the marks the harness times the boot by (systemd's
    # own lines split the userspace phase in the bench).
    if [ -e "$flags/full-kmsg" ]; then
        dmesg 2>&1
    else
        dmesg 2>&1 | grep -E 'vfio|DMAR|AMD-Vi|IOMMU|Run /init|EXT4-fs \(.*\): mounted|running in system mode|Started systemd-udevd|boot-test:'
    fi

    section end
}

# What grub.cfg's default (first) entry boots, written to the transfer disk for the
# harness's next direct boot.
next_boot() {
    cfg=/boot/grub/grub.cfg
    xfer=/dev/disk/by-id/virtio-vfe-transfer
    kernel=$(sed -n 's/^[[:space:]]*linux[[:space:]]\{1,\}\([^[:space:]]*\).*/\1/p' "$cfg" | head -n 1)
    initrd=$(sed -n 's/^[[:space:]]*initrd[[:space:]]\{1,\}\([^[:space:]]*\).*/\1/p' "$cfg" | head -n 1)
    echo "kernel=$kernel initrd=$initrd"
    if [ -e "$xfer" ]; then
        tar -cf "$xfer" -C / boot/grub/grub.cfg "${kernel#/}" "${initrd#/}" 2>&1
        echo "exit=$?"
    else
        echo "no transfer disk: the bootloader on the disk chooses"
        echo "exit=0"
    fi
}

# Keep the kernel quiet on the console while the report is written.
dmesg -n 1 2>/dev/null
report 2>&1 | sed 's/^/@@ /' > /dev/ttyS0
sync
if command -v systemctl >/dev/null; then
    systemctl poweroff --force --force
else
    poweroff -f
fi
