// vcsim: our launcher for govmomi's vCenter simulator (Debian ships the library, not the
// command). Build: GO111MODULE=off GOPATH=/usr/share/gocode go build -o target/vcsim/vcsim .
//
// It serves the vim25 SOAP API on https://ADDR/sdk and the datastore file API on /folder.
// With -env-file it writes, once the server is listening, KEY=VALUE lines:
//
//	VCSIM_URL=https://USER:PASS@127.0.0.1:PORT/sdk   VCSIM_HOST, VCSIM_PORT, VCSIM_USERNAME,
//	VCSIM_PASSWORD, VCSIM_PID, VCSIM_CERT (PEM of the server certificate) and, per datastore,
//	VCSIM_DATASTORE_<NAME>=<directory on disk> (tests read uploaded files from there).
//
// Datastore directories are created under $TMPDIR, so a test that sets TMPDIR to its own
// temporary directory needs no cleanup. The process exits on SIGINT/SIGTERM, and on EOF of
// stdin with -exit-on-eof (so a test that dies cannot leak a simulator).
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"log"
	"net/url"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

func main() {
	listen := flag.String("l", "127.0.0.1:0", "listen address (host:port; port 0 picks a free one)")
	username := flag.String("username", "user", "login user name")
	password := flag.String("password", "pass", "login password")
	dc := flag.Int("dc", 1, "number of datacenters")
	hosts := flag.Int("standalone-host", 1, "standalone hosts per datacenter")
	clusters := flag.Int("cluster", 1, "clusters per datacenter")
	clusterHosts := flag.Int("host", 3, "hosts per cluster")
	vms := flag.Int("vm", 2, "VMs per resource pool (one pool per standalone host and cluster)")
	datastores := flag.Int("ds", 1, "datastores (mounted on every host)")
	autostart := flag.Bool("autostart", true, "power on the model VMs")
	toolsRunning := flag.Bool("tools-running", false, "report VMware Tools as running in every VM (enables ShutdownGuest)")
	idle := flag.Duration("session-idle-timeout", 0, "expire sessions idle this long (0 = never)")
	envFile := flag.String("env-file", "", "write VCSIM_* variables here once listening")
	certFile := flag.String("tlscert", "", "server certificate PEM (default: Go's built-in localhost certificate)")
	keyFile := flag.String("tlskey", "", "server key PEM (with -tlscert)")
	exitOnEOF := flag.Bool("exit-on-eof", false, "exit when stdin reaches EOF")
	flag.Parse()

	model := simulator.VPX()
	model.Datacenter, model.Host, model.Cluster = *dc, *hosts, *clusters
	model.ClusterHost, model.Machine, model.Datastore = *clusterHosts, *vms, *datastores
	model.Autostart = *autostart
	simulator.SessionIdleTimeout = *idle
	if err := model.Create(); err != nil {
		log.Fatalf("vcsim: create model: %v", err)
	}
	defer model.Remove()

	if *toolsRunning {
		for _, e := range simulator.Map.All("VirtualMachine") {
			vm := e.(*simulator.VirtualMachine)
			vm.Guest.ToolsRunningStatus = string(types.VirtualMachineToolsRunningStatusGuestToolsRunning)
			vm.Guest.ToolsStatus = types.VirtualMachineToolsStatusToolsOk
		}
	}

	model.Service.TLS = new(tls.Config)
	if *certFile != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			log.Fatalf("vcsim: load -tlscert %s / -tlskey %s: %v", *certFile, *keyFile, err)
		}
		model.Service.TLS.Certificates = []tls.Certificate{cert}
	}
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*username, *password)}
	model.Service.RegisterEndpoints = true
	server := model.Service.NewServer()
	defer server.Close()

	if *envFile != "" {
		if err := writeEnv(*envFile, server, *username, *password); err != nil {
			log.Fatalf("vcsim: write %s: %v", *envFile, err)
		}
	}
	fmt.Printf("vcsim listening on %s\n", server.URL.String())

	done := make(chan os.Signal, 1)
	signal.Notify(done, syscall.SIGINT, syscall.SIGTERM)
	if *exitOnEOF {
		go func() { _, _ = io.Copy(ioutil.Discard, os.Stdin); done <- syscall.SIGTERM }()
	}
	<-done
}

// writeEnv writes the file under a temporary name and renames it, so a reader never sees half.
func writeEnv(path string, server *simulator.Server, user, pass string) error {
	u := *server.URL
	u.User = url.UserPassword(user, pass)
	cert, err := server.CertificateFile()
	if err != nil {
		return err
	}
	lines := []string{
		"VCSIM_URL=" + u.String(),
		"VCSIM_HOST=" + server.URL.Hostname(),
		"VCSIM_PORT=" + server.URL.Port(),
		"VCSIM_USERNAME=" + user,
		"VCSIM_PASSWORD=" + pass,
		"VCSIM_CERT=" + cert,
		fmt.Sprintf("VCSIM_PID=%d", os.Getpid()),
		"VCSIM_STARTED=" + time.Now().UTC().Format(time.RFC3339),
	}
	var ds []string
	for _, e := range simulator.Map.All("Datastore") {
		d := e.(*simulator.Datastore)
		ds = append(ds, "VCSIM_DATASTORE_"+strings.ToUpper(d.Name)+"="+d.Info.GetDatastoreInfo().Url)
	}
	sort.Strings(ds)
	lines = append(lines, ds...)
	tmp := path + ".tmp"
	if err := ioutil.WriteFile(tmp, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
