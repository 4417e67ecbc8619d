#!/bin/sh
# dracut pre-udev hook (sourced, so no exit): binds the configured devices to vfio-pci
# before udev starts. The binder never blocks boot and always returns 0.
if [ -x /usr/sbin/vfio-early ]; then
	/usr/sbin/vfio-early bind --early || :
fi
