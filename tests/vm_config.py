#!/usr/bin/python3
"""Independent reader of vCenter VM configuration for the mass-failback tests.

Uses Debian's python3-pyvmomi (not our Rust `vcenter` crate), so a test that compares a VM
before and after a run does not trust the code under test to read what it wrote.

  vm_config.py dump              JSON on stdout: per VM (not templates) its name, moref,
                                 power state, every device (all properties, recursively),
                                 its boot options and its snapshot tree
  vm_config.py customise NAME    give VM NAME's first CD-ROM a host-device (ATAPI) backing,
                                 start-connected, connected, no guest control, and boot
                                 options of its own (boot delay, disk first, retry), so that
                                 "exactly as before" is tested on more than vcsim's defaults
  vm_config.py set NAME uuid=U   give VM NAME the BIOS UUID U (vcsim derives UUIDs from the
                                 inventory path, so two simulators have the same ones)
  vm_config.py set NAME guest_ip=IP
                                 make vcsim report IP as the guest's address (guest.ipAddress)

Connection from the environment: VCENTER_HOST (https://host:port/sdk), VCENTER_USER,
VCENTER_PASSWORD; the certificate is not checked (vcsim's is self-signed).
"""
import datetime
import json
import os
import ssl
import sys
from urllib.parse import urlparse

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim
from pyVmomi.VmomiSupport import DataObject, ManagedObject


def connect():
    url = urlparse(os.environ["VCENTER_HOST"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return SmartConnect(host=url.hostname, port=url.port or 443,
                        user=os.environ["VCENTER_USER"], pwd=os.environ["VCENTER_PASSWORD"],
                        sslContext=ctx)


def plain(value):
    """A pyVmomi value as JSON-able data: data objects as {"_type": ..., property: ...}."""
    if isinstance(value, ManagedObject):
        return "%s:%s" % (value._wsdlName, value._moId)
    if isinstance(value, DataObject):
        out = {"_type": value._wsdlName}
        for prop in value._GetPropertyList():
            v = getattr(value, prop.name)
            if v is None or (isinstance(v, list) and not v):
                continue
            out[prop.name] = plain(v)
        return out
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, type):
        return value.__name__
    return value


def snapshots(tree):
    return [{"name": s.name, "description": s.description, "children": snapshots(s.childSnapshotList)}
            for s in tree or []]


def all_vms(si):
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        return [vm for vm in view.view if not vm.config.template]
    finally:
        view.Destroy()


def dump(si):
    out = []
    for vm in sorted(all_vms(si), key=lambda v: v.name):
        out.append({
            "name": vm.name,
            "moref": vm._moId,
            "power": str(vm.runtime.powerState),
            "devices": sorted(plain(list(vm.config.hardware.device)), key=lambda d: d["key"]),
            "boot_options": plain(vm.config.bootOptions),
            "snapshots": snapshots(vm.snapshot.rootSnapshotList if vm.snapshot else []),
        })
    json.dump(out, sys.stdout, indent=1, sort_keys=True)


def customise(si, name):
    vm = next(v for v in all_vms(si) if v.name == name)
    devices = vm.config.hardware.device
    cd = next(d for d in devices if isinstance(d, vim.vm.device.VirtualCdrom))
    disk = next(d for d in devices if isinstance(d, vim.vm.device.VirtualDisk))
    cd.backing = vim.vm.device.VirtualCdrom.AtapiBackingInfo(deviceName="/dev/cdrom", useAutoDetect=False)
    cd.connectable = vim.vm.device.VirtualDevice.ConnectInfo(startConnected=True, connected=True,
                                                             allowGuestControl=False)
    change = vim.vm.device.VirtualDeviceSpec(operation="edit", device=cd)
    boot = vim.vm.BootOptions(
        bootDelay=3000, bootRetryEnabled=True, bootRetryDelay=10000, enterBIOSSetup=False,
        bootOrder=[vim.vm.BootOptions.BootableDiskDevice(deviceKey=disk.key),
                   vim.vm.BootOptions.BootableCdromDevice()])
    task = vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[change], bootOptions=boot))
    if task.info.state != "success":
        sys.exit("reconfigure %s: %s" % (name, task.info.error))


def set_fields(si, name, assignments):
    vm = next(v for v in all_vms(si) if v.name == name)
    spec = vim.vm.ConfigSpec()
    for a in assignments:
        key, value = a.split("=", 1)
        if key == "uuid":
            spec.uuid = value
        elif key == "guest_ip":
            # vcsim's hook: "SET.<property>" extraConfig keys set that VM property.
            spec.extraConfig = [vim.option.OptionValue(key="SET.guest.ipAddress", value=value)]
        else:
            sys.exit("unknown field %s" % key)
    task = vm.ReconfigVM_Task(spec)
    if task.info.state != "success":
        sys.exit("reconfigure %s: %s" % (name, task.info.error))


def main():
    si = connect()
    try:
        if sys.argv[1:] == ["dump"]:
            dump(si)
        elif len(sys.argv) == 3 and sys.argv[1] == "customise":
            customise(si, sys.argv[2])
        elif len(sys.argv) >= 4 and sys.argv[1] == "set":
            set_fields(si, sys.argv[2], sys.argv[3:])
        else:
            sys.exit(__doc__)
    finally:
        Disconnect(si)


if __name__ == "__main__":
    main()
