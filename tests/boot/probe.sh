#!/bin/sh
# vfio-early boot-test probe. Installed into test images as
# /usr/local/sbin/vfio-early-probe and started by vfio-early-probe.service once the
# guest is up. It prints what the harness asserts on the serial console, every line
# prefixed with "@@ " so kernel messages in between cannot be mistaken for it, then
# powers the guest off. Only the image's own userland is used (coreutils, sed, grep).

section() { echo "== $1"; }

report() {
    section cmdline
    cat /proc/cmdline

    section drivers
    for dev in /sys/bus/pci/devices/*; do
        drv=none
        [ -e "$dev/driver" ] && drv=$(basename "$(readlink "$dev/driver")")
        echo "$(basename "$dev") $(cat "$dev/vendor" "$dev/device" | tr '\n' ' ')$drv"
    done

    section modules
    cut -d' ' -f1 /proc/modules | sort

    section vfio-dev
    ls /dev/vfio 2>&1

    section kmsg
    # The kernel log as the probe sees it: our lines, the IOMMU and the timestamps
    # of the initramfs stage (for the bench).
    dmesg 2>&1 | grep -E 'vfio-early|vfio|DMAR|AMD-Vi|IOMMU|Run /init|EXT4-fs \(.*\): mounted' 

    if [ -e /etc/vfio-early-probe/apply-in-guest ]; then
        section guest-apply
        vfio-early apply 2>&1
        echo "exit=$?"
        section guest-files
        ls /etc/modprobe.d/vfio-early.conf /etc/default/grub.d/vfio-early.cfg \
            /var/lib/vfio-early/manifest.json 2>&1
    fi

    section list
    vfio-early list 2>&1
    echo "exit=$?"

    section status
    vfio-early status 2>&1
    echo "exit=$?"

    section status-json
    vfio-early status --json 2>&1
    echo "exit=$?"

    section end
}

# Keep the kernel quiet on the console while the report is written.
dmesg -n 1 2>/dev/null
report 2>&1 | sed 's/^/@@ /' > /dev/ttyS0
sync
systemctl poweroff --force --force
