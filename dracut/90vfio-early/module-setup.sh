#!/bin/bash
# dracut module vfio-early: puts vfio-early, the config of its last `apply`, its
# modprobe drop-in, the kernel's vfio modules and, while a trial is prepared, the
# trial's config into the image, and binds from a pre-udev hook (before udev loads
# any driver). Adds nothing when no device is configured. Every decision comes from
# `vfio-early hook-files`.
# shellcheck disable=SC2154 # $kernel and $moddir are set by dracut

check() {
	require_binaries /usr/sbin/vfio-early || return 1
	return 0
}

depends() {
	return 0
}

installkernel() {
	local kind a b
	/usr/sbin/vfio-early hook-files --kernel "$kernel" | while read -r kind a b; do
		if [ "$kind" = module ]; then
			# Missing optional modules (vfio_virqfd on 6.2+) are tolerated.
			hostonly='' instmods "$a"
		fi
	done
}

install() {
	local plan kind a b
	plan=$(/usr/sbin/vfio-early hook-files --kernel "$kernel") || return 0
	[ -n "$plan" ] || return 0
	inst_binary /usr/sbin/vfio-early
	while read -r kind a b; do
		if [ "$kind" = file ]; then
			inst_simple "$a" "$b"
		fi
	done <<<"$plan"
	inst_hook pre-udev 00 "$moddir/vfio-early-bind.sh"
}
