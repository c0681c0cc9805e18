// hypervisor: plays the hypervisor for vcsim VMs in end-to-end tests (vcsim cannot boot a VM).
//
// It watches every VM over SOAP. When a VM is powered on with an ISO attached to a CD-ROM
// and the CD-ROM first in its boot order, it boots QEMU (TCG, -no-reboot) with the ISOs
// (files from vcsim's datastore directories; the one labelled FBSEED is the seed), that VM's
// disk image (DISK_DIR/<vm name>.img), its first MAC and its BIOS UUID as SMBIOS UUID. When
// the guest powers off or reboots (QEMU exits), it powers the vcsim VM off; when the vcsim VM
// is powered off (the orchestrator did it), it stops QEMU. A VM powered on without an ISO
// first in its boot order is left alone, unless -boot-disks is given and the harness booted
// that VM from the appliance ISO before: then QEMU boots the VM's disk image (the restored
// OS; its console goes to <vm name>.disk.serial.log) and the VM is powered off when the
// guest powers off, as for an ISO boot. (VMs that were on before any failback stay alone.)
//
// Power-ons, not power states: a QEMU belongs to the power-on it was started for, named by
// the VM's boot time (vcsim 0.24.2 sets summary.runtime.bootTime, with nanoseconds, on every
// power-on and reset; runtime.bootTime stays unset). The orchestrator may power a VM off,
// reconfigure it and power it on again between two polls; the harness then sees a new boot
// time, not an off VM. So: a QEMU whose power-on is over (VM off or booted again) is stopped;
// a guest that exits powers the VM off only if the VM is still in the guest's power-on (a
// new power-on is never touched); a power-on gets at most one QEMU.
//
// Build: GO111MODULE=off GOPATH=/usr/share/gocode go build -o target/hypervisor/hypervisor .
// Usage: hypervisor -vcsim-env FILE -disk-dir DIR [-log-dir DIR] [-mem 512] [-qemu PATH]
// Prints one line per event on stdout: "boot VM ARGS", "stop VM" (its power-on is over),
// "exit VM CODE", then after a guest exited by itself "poweroff VM" or "keep VM REASON".
// With -exit-on-eof, each stdin line "poll" polls at once and prints "polled" (tests use a
// long -poll to decide exactly when the harness looks).
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io/ioutil"
	"log"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/view"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

type guest struct {
	cmd  *exec.Cmd
	done chan struct{}
	// boot: the power-on this QEMU belongs to (powerOn of the VM when QEMU started).
	boot string
	// stopping: we killed it because vcsim says the VM is off.
	stopping bool
}

type harness struct {
	client     *govmomi.Client
	datastores map[string]string // datastore name -> directory
	diskDir    string
	logDir     string
	qemu       string
	mem        int
	extra      []string
	mu         sync.Mutex
	running    map[string]*guest // VM moref -> QEMU
	// ended: VM moref -> the power-on whose QEMU has ended; never boot it again.
	ended map[string]string
	out   *log.Logger
	// bootDisks: also boot QEMU for power-ons from disk (the restored OS) of VMs in hadIso.
	bootDisks bool
	// hadIso: VM morefs the harness booted from the appliance ISO.
	hadIso map[string]bool
}

func readEnv(path string) (map[string]string, error) {
	data, err := ioutil.ReadFile(path)
	if err != nil {
		return nil, err
	}
	env := map[string]string{}
	for _, line := range strings.Split(string(data), "\n") {
		if i := strings.IndexByte(line, '='); i > 0 {
			env[line[:i]] = line[i+1:]
		}
	}
	return env, nil
}

func main() {
	vcsimEnv := flag.String("vcsim-env", "", "env file written by our vcsim launcher (-env-file)")
	diskDir := flag.String("disk-dir", "", "directory holding <vm name>.img raw disk images")
	logDir := flag.String("log-dir", "", "directory for per-VM serial console logs (default: disk-dir)")
	qemu := flag.String("qemu", "qemu-system-x86_64", "QEMU binary")
	mem := flag.Int("mem", 512, "guest RAM in MiB")
	poll := flag.Duration("poll", 300*time.Millisecond, "poll interval")
	extra := flag.String("qemu-args", "", "extra QEMU arguments (space separated)")
	exitOnEOF := flag.Bool("exit-on-eof", false, "exit (stopping every guest) when stdin reaches EOF")
	bootDisks := flag.Bool("boot-disks", false, "also boot QEMU when a VM powers on from its disk (the restored OS)")
	flag.Parse()
	if *vcsimEnv == "" || *diskDir == "" {
		log.Fatal("hypervisor: -vcsim-env and -disk-dir are required")
	}
	env, err := readEnv(*vcsimEnv)
	if err != nil {
		log.Fatalf("hypervisor: read %s: %v", *vcsimEnv, err)
	}
	u, err := url.Parse(env["VCSIM_URL"])
	if err != nil || env["VCSIM_URL"] == "" {
		log.Fatalf("hypervisor: no VCSIM_URL in %s", *vcsimEnv)
	}
	h := &harness{
		datastores: map[string]string{},
		diskDir:    *diskDir,
		logDir:     *logDir,
		qemu:       *qemu,
		mem:        *mem,
		running:    map[string]*guest{},
		ended:      map[string]string{},
		out:        log.New(os.Stdout, "", 0),
		bootDisks:  *bootDisks,
		hadIso:     map[string]bool{},
	}
	if h.logDir == "" {
		h.logDir = *diskDir
	}
	if *extra != "" {
		h.extra = strings.Fields(*extra)
	}
	for k, v := range env {
		if strings.HasPrefix(k, "VCSIM_DATASTORE_") {
			h.datastores[strings.ToUpper(strings.TrimPrefix(k, "VCSIM_DATASTORE_"))] = v
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.client, err = govmomi.NewClient(ctx, u, true)
	if err != nil {
		log.Fatalf("hypervisor: login to %s: %v", u.Host, err)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	pollNow := make(chan struct{})
	if *exitOnEOF {
		go func() {
			sc := bufio.NewScanner(os.Stdin)
			for sc.Scan() {
				if strings.TrimSpace(sc.Text()) == "poll" {
					pollNow <- struct{}{}
				}
			}
			sig <- syscall.SIGTERM
		}()
	}
	go func() { <-sig; cancel() }()
	h.out.Printf("ready")
	asked := false
	for ctx.Err() == nil {
		if err := h.tick(ctx); err != nil && ctx.Err() == nil {
			fmt.Fprintf(os.Stderr, "hypervisor: %v\n", err)
		}
		if asked {
			h.out.Printf("polled")
		}
		select {
		case <-ctx.Done():
		case <-time.After(*poll):
			asked = false
		case <-pollNow:
			asked = true
		}
	}
	h.mu.Lock()
	for _, g := range h.running {
		g.stopping = true
		_ = g.cmd.Process.Kill()
	}
	h.mu.Unlock()
}

var dsPath = regexp.MustCompile(`^\[([^\]]+)\]\s*(.*)$`)

// file resolves "[LocalDS_0] a/b.iso" to a path on disk.
func (h *harness) file(name string) (string, error) {
	m := dsPath.FindStringSubmatch(name)
	if m == nil {
		return "", fmt.Errorf("not a datastore path: %q", name)
	}
	dir, ok := h.datastores[strings.ToUpper(m[1])]
	if !ok {
		return "", fmt.Errorf("unknown datastore %q in %q", m[1], name)
	}
	return filepath.Join(dir, m[2]), nil
}

// isoLabel reads the ISO 9660 volume label (primary volume descriptor, sector 16).
func isoLabel(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	buf := make([]byte, 2048)
	if _, err := f.ReadAt(buf, 32768); err != nil || string(buf[1:6]) != "CD001" {
		return ""
	}
	return strings.TrimRight(string(buf[40:72]), " ")
}

// bootsFromIso: CD-ROM first in the boot order and at least one CD-ROM with an ISO that
// connects at power on. Returns the ISO datastore paths.
func bootsFromIso(vm mo.VirtualMachine) []string {
	if vm.Config == nil || vm.Config.BootOptions == nil || len(vm.Config.BootOptions.BootOrder) == 0 {
		return nil
	}
	if _, ok := vm.Config.BootOptions.BootOrder[0].(*types.VirtualMachineBootOptionsBootableCdromDevice); !ok {
		return nil
	}
	var isos []string
	for _, d := range vm.Config.Hardware.Device {
		cd, ok := d.(*types.VirtualCdrom)
		if !ok {
			continue
		}
		b, ok := cd.Backing.(*types.VirtualCdromIsoBackingInfo)
		if !ok || b.FileName == "" {
			continue
		}
		if cd.Connectable != nil && !cd.Connectable.StartConnected {
			continue
		}
		isos = append(isos, b.FileName)
	}
	return isos
}

func firstMac(vm mo.VirtualMachine) string {
	for _, d := range vm.Config.Hardware.Device {
		if n, ok := d.(types.BaseVirtualEthernetCard); ok {
			if m := n.GetVirtualEthernetCard().MacAddress; m != "" {
				return m
			}
		}
	}
	return ""
}

// powerOn names a VM's current power-on: its boot time with nanoseconds ("" while off).
// vcsim stamps every power-on (and reset) with time.Now(), so two power-ons never share it.
func powerOn(vm mo.VirtualMachine) string {
	if vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
		return ""
	}
	if vm.Summary.Runtime.BootTime == nil {
		// Powered on without a boot time (an inventory VM vcsim created powered on).
		return "on"
	}
	return vm.Summary.Runtime.BootTime.UTC().Format(time.RFC3339Nano)
}

func (h *harness) tick(ctx context.Context) error {
	m := view.NewManager(h.client.Client)
	v, err := m.CreateContainerView(ctx, h.client.ServiceContent.RootFolder, []string{"VirtualMachine"}, true)
	if err != nil {
		return err
	}
	defer v.Destroy(ctx)
	var vms []mo.VirtualMachine
	props := []string{"name", "runtime.powerState", "summary.runtime.bootTime", "config"}
	if err := v.Retrieve(ctx, []string{"VirtualMachine"}, props, &vms); err != nil {
		return err
	}
	for _, vm := range vms {
		id := vm.Self.Value
		boot := powerOn(vm)
		h.mu.Lock()
		g := h.running[id]
		ended := h.ended[id]
		h.mu.Unlock()
		if g != nil && g.boot != boot {
			// Its power-on is over: the VM is off, or was powered off and on again
			// (e.g. from disk) since the last poll. Kill it as the power-off would have.
			h.mu.Lock()
			g.stopping = true
			h.mu.Unlock()
			h.out.Printf("stop %s", vm.Name)
			_ = g.cmd.Process.Kill()
			<-g.done
			ended = g.boot // the old power-on; the current one may boot its own QEMU
			g = nil
		}
		if g != nil || boot == "" || boot == ended || vm.Config == nil {
			continue
		}
		isos := bootsFromIso(vm)
		h.mu.Lock()
		restored := h.bootDisks && h.hadIso[id]
		h.mu.Unlock()
		if len(isos) == 0 && !restored {
			continue
		}
		if err := h.boot(ctx, vm, boot, isos); err != nil {
			fmt.Fprintf(os.Stderr, "hypervisor: boot %s: %v\n", vm.Name, err)
			h.out.Printf("error %s %v", vm.Name, err)
			h.mu.Lock()
			h.ended[id] = boot
			h.mu.Unlock()
			h.powerOff(ctx, vm.Self, vm.Name, boot)
		}
	}
	return nil
}

// powerOff powers the VM off if it is still in power-on `boot`; a VM that is off already,
// or powered on again since (a new power-on), is left as it is. The power-on is read right
// before PowerOffVM_Task: there is no conditional power-off in vSphere, so the only window
// left is that one round trip (the race this guards against spans a whole poll interval).
func (h *harness) powerOff(ctx context.Context, ref types.ManagedObjectReference, name, boot string) {
	var cur mo.VirtualMachine
	pc := property.DefaultCollector(h.client.Client)
	if err := pc.RetrieveOne(ctx, ref, []string{"runtime.powerState", "summary.runtime.bootTime"}, &cur); err != nil {
		fmt.Fprintf(os.Stderr, "hypervisor: read power state of %s: %v\n", name, err)
		h.out.Printf("keep %s cannot read its power state: %v", name, err)
		return
	}
	switch now := powerOn(cur); {
	case now == "":
		h.out.Printf("keep %s already off", name)
		return
	case now != boot:
		h.out.Printf("keep %s powered on again since QEMU started", name)
		return
	}
	task, err := object.NewVirtualMachine(h.client.Client, ref).PowerOff(ctx)
	if err == nil {
		err = task.Wait(ctx)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "hypervisor: power off %s: %v\n", name, err)
		h.out.Printf("keep %s power off failed: %v", name, err)
		return
	}
	h.out.Printf("poweroff %s", name)
}

func (h *harness) boot(ctx context.Context, vm mo.VirtualMachine, boot string, isos []string) error {
	var appliance, seed []string
	for _, iso := range isos {
		p, err := h.file(iso)
		if err != nil {
			return err
		}
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("ISO %s: %v", iso, err)
		}
		if isoLabel(p) == "FBSEED" {
			seed = append(seed, p)
		} else {
			appliance = append(appliance, p)
		}
	}
	disk := filepath.Join(h.diskDir, vm.Name+".img")
	if _, err := os.Stat(disk); err != nil {
		return fmt.Errorf("disk image: %v", err)
	}
	// A power-on from disk (no ISO first: the restored OS) logs to its own file.
	console, order := vm.Name+".serial.log", "d"
	if len(isos) == 0 {
		console, order = vm.Name+".disk.serial.log", "c"
	}
	args := []string{
		"-accel", "tcg", "-m", fmt.Sprint(h.mem), "-smp", "1", "-no-reboot",
		"-display", "none", "-monitor", "none", "-nodefaults",
		"-serial", "file:" + filepath.Join(h.logDir, console),
		"-boot", "order=" + order,
	}
	if vm.Config.Uuid != "" {
		args = append(args, "-smbios", "type=1,uuid="+vm.Config.Uuid)
	}
	// CD-ROMs on IDE like a VMware VM's; the appliance first so SeaBIOS boots it.
	idx := 0
	for _, p := range append(appliance, seed...) {
		args = append(args, "-drive", fmt.Sprintf("file=%s,media=cdrom,if=ide,index=%d,readonly=on", p, idx))
		idx++
	}
	args = append(args, "-drive", "file="+disk+",format=raw,if=virtio,cache=writeback")
	nic := "virtio-net-pci,netdev=n0"
	if mac := firstMac(vm); mac != "" {
		nic += ",mac=" + mac
	}
	args = append(args, "-netdev", "user,id=n0", "-device", nic)
	args = append(args, h.extra...)
	cmd := exec.Command(h.qemu, args...)
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		return err
	}
	g := &guest{cmd: cmd, done: make(chan struct{}), boot: boot}
	h.mu.Lock()
	h.running[vm.Self.Value] = g
	if len(isos) > 0 {
		h.hadIso[vm.Self.Value] = true
	}
	h.mu.Unlock()
	h.out.Printf("boot %s %s", vm.Name, strings.Join(args, " "))
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			fmt.Fprintf(os.Stderr, "qemu %s: %s\n", vm.Name, sc.Text())
		}
	}()
	go func() {
		err := cmd.Wait()
		code := 0
		if err != nil {
			code = -1
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			}
		}
		h.mu.Lock()
		stopping := g.stopping
		delete(h.running, vm.Self.Value)
		h.ended[vm.Self.Value] = boot
		h.mu.Unlock()
		h.out.Printf("exit %s %d", vm.Name, code)
		if !stopping {
			// The guest powered off or rebooted (-no-reboot): its power-on is over, unless
			// the VM was powered off and on again meanwhile.
			h.powerOff(ctx, vm.Self, vm.Name, boot)
		}
		close(g.done)
	}()
	return nil
}
