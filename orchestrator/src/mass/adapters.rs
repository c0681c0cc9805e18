//! The real backends behind the engine's traits: vCenter (`failback-vcenter`), the DR
//! service admin API (HTTPS, CA pinned), and the seed-ISO builder (`failback-iso`).

use super::backend::*;
use crate::admin_client::{AdminClient, AdminError};
use async_trait::async_trait;
use failback_api::{CreateTokenRequest, RecoveryInstance, TokenKind};
use failback_config::plan::NetworkMode;
use failback_config::seed::{self, SeedConfig};
use failback_vcenter as vc;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn vc_err(e: vc::Error) -> BackendError {
    BackendError {
        message: e.to_string(),
        transient: e.is_transient(),
        source: Some(Box::new(e)),
    }
}

/// vCenter through the SOAP client; ISOs live in one datastore.
pub struct VcenterBackend {
    pub client: vc::Client,
    pub datastore: String,
}

impl VcenterBackend {
    fn vmref(moref: &str) -> vc::VmRef {
        vc::VmRef {
            moref: vc::MoRef::new("VirtualMachine", moref),
            name: moref.to_string(),
        }
    }

    async fn vmref_named(&self, moref: &str) -> BResult<vc::VmRef> {
        let vm = self
            .client
            .vm(&vc::MoRef::new("VirtualMachine", moref))
            .await
            .map_err(vc_err)?;
        Ok(vm.vmref)
    }
}

/// A power task refused because the VM already is where it was asked to go (the guest powered
/// itself off between our state check and the task, e.g. when the appliance finishes) has done
/// its job.
fn already_there(res: vc::Result<()>) -> vc::Result<()> {
    match res {
        Err(e)
            if e.fault().is_some_and(|f| {
                matches!(&f.kind, vc::FaultKind::InvalidPowerState { requested: Some(r), existing: Some(x) } if r == x)
            }) =>
        {
            tracing::debug!("{e}: already in that state");
            Ok(())
        }
        other => other,
    }
}

fn vm_info(s: &vc::VmSummary) -> VmInfo {
    VmInfo {
        vcenter: None,
        moref: s.moref.clone(),
        name: s.name.clone(),
        bios_uuid: s.bios_uuid.clone(),
        instance_uuid: s.instance_uuid.clone(),
        macs: s.macs.clone(),
        power: match s.power_state {
            vc::PowerState::PoweredOn => Power::On,
            vc::PowerState::Suspended => Power::Suspended,
            _ => Power::Off,
        },
        tools_running: s.tools_running,
        guest_ip: s.guest_ip.clone(),
        disks: s
            .disks
            .iter()
            .map(|d| VmDisk {
                label: d.label.clone(),
                size_bytes: d.capacity_bytes,
                file: d.file.clone(),
            })
            .collect(),
    }
}

#[async_trait]
impl Hypervisor for VcenterBackend {
    async fn list_vms(&self) -> BResult<Vec<VmInfo>> {
        let all = self.client.vm_summaries().await.map_err(vc_err)?;
        Ok(all.iter().filter(|s| !s.template).map(vm_info).collect())
    }

    async fn vm(&self, moref: &str) -> BResult<VmInfo> {
        let vm = self
            .client
            .vm(&vc::MoRef::new("VirtualMachine", moref))
            .await
            .map_err(vc_err)?;
        Ok(vm_info(&vm.summary))
    }

    async fn upload(&self, local: &Path, ds_path: &str, sha256_hex: &str) -> BResult<()> {
        let report = self
            .client
            .upload(
                local,
                &self.datastore,
                ds_path,
                vc::UploadOptions {
                    verify_sha256: true,
                },
                Arc::new(vc::NoProgress),
            )
            .await
            .map_err(vc_err)?;
        if !report.sha256_verified || !report.sha256.eq_ignore_ascii_case(sha256_hex) {
            return Err(BackendError::transient(format!(
                "upload of {} to [{}] {ds_path}: SHA-256 check failed (expected {sha256_hex}, local {}, verified {})",
                local.display(),
                self.datastore,
                report.sha256,
                report.sha256_verified
            )));
        }
        Ok(())
    }

    async fn has_file(&self, ds_path: &str, size: u64, sha256_hex: &str) -> BResult<bool> {
        let have = self
            .client
            .datastore_file_size(&self.datastore, ds_path)
            .await
            .map_err(vc_err)?;
        if have != Some(size) {
            return Ok(false);
        }
        let sha = self
            .client
            .datastore_file_sha256(&self.datastore, ds_path)
            .await
            .map_err(vc_err)?;
        Ok(sha.eq_ignore_ascii_case(sha256_hex))
    }

    async fn shutdown_guest(&self, moref: &str) -> BResult<()> {
        let vm = self.vmref_named(moref).await?;
        // Zero wait: the engine polls the power state itself with the plan's timeout.
        match self.client.shutdown_guest(&vm, Duration::ZERO).await {
            Ok(()) | Err(vc::Error::TaskTimeout { .. }) => Ok(()),
            Err(e) => Err(vc_err(e)),
        }
    }

    async fn power_off(&self, moref: &str) -> BResult<()> {
        let vm = self.vmref_named(moref).await?;
        already_there(self.client.power(&vm, vc::PowerOp::Off).await).map_err(vc_err)
    }

    async fn power_on(&self, moref: &str) -> BResult<()> {
        let vm = self.vmref_named(moref).await?;
        already_there(self.client.power(&vm, vc::PowerOp::On).await).map_err(vc_err)
    }

    async fn create_snapshot(&self, moref: &str, name: &str, description: &str) -> BResult<String> {
        let vm = self.vmref_named(moref).await?;
        let snap = self
            .client
            .create_snapshot(&vm, name, description, false, false)
            .await
            .map_err(vc_err)?;
        Ok(snap.value)
    }

    async fn revert_snapshot(&self, moref: &str, snapshot: &str) -> BResult<()> {
        let vm = self.vmref_named(moref).await?;
        self.client
            .revert_to_snapshot(&vm, &vc::MoRef::new("VirtualMachineSnapshot", snapshot))
            .await
            .map_err(vc_err)
    }

    async fn remove_snapshot(&self, moref: &str, snapshot: &str) -> BResult<()> {
        let vm = self.vmref_named(moref).await?;
        self.client
            .remove_snapshot_ref(&vm, &vc::MoRef::new("VirtualMachineSnapshot", snapshot))
            .await
            .map(|_| ())
            .map_err(vc_err)
    }

    async fn delete_file(&self, ds_path: &str) -> BResult<()> {
        self.client
            .delete_datastore_file(&self.datastore, ds_path)
            .await
            .map(|_| ())
            .map_err(vc_err)
    }

    async fn save_boot(&self, moref: &str) -> BResult<SavedBoot> {
        let vm = self.vmref_named(moref).await?;
        let saved = self.client.boot_options(&vm).await.map_err(vc_err)?;
        serde_json::to_string(&saved)
            .map(SavedBoot)
            .map_err(|e| BackendError::permanent(format!("encode boot options of VM {vm}: {e}")))
    }

    async fn attach_isos(
        &self,
        moref: &str,
        isos: &[String],
        devices_before: Option<&DevicesBefore>,
    ) -> BResult<Vec<AttachedCdrom>> {
        let vm = self.vmref_named(moref).await?;
        let mut atts = vec![];
        for iso in isos {
            atts.push(
                self.client
                    .attach_iso(&vm, &self.datastore, iso)
                    .await
                    .map_err(vc_err)?,
            );
        }
        if let Some(b) = devices_before {
            // A drive already holding the ISO may be one an interrupted run added, or one it
            // reused: what it was comes from the record taken before anything changed.
            let before = &b.keys;
            let now = self.client.vm(&vm.moref).await.map_err(vc_err)?;
            for att in &mut atts {
                if before.contains(&att.device_key) {
                    if let Some((_, orig)) = b.cdroms.iter().find(|(k, _)| *k == att.device_key) {
                        att.original = Some(orig.clone());
                    }
                } else {
                    att.added_cdrom = true;
                    if att.added_controller_key.is_none() {
                        att.added_controller_key = now
                            .device(att.device_key)
                            .and_then(|d| d.controller_key)
                            .filter(|c| !before.contains(c));
                    }
                }
            }
        }
        Ok(atts
            .into_iter()
            .map(|att| AttachedCdrom {
                device_key: att.device_key,
                added: att.added_cdrom,
                iso: att.iso.clone(),
                detail: serde_json::to_string(&att).ok(),
            })
            .collect())
    }

    async fn devices_before(&self, moref: &str) -> BResult<DevicesBefore> {
        let vm = self
            .client
            .vm(&vc::MoRef::new("VirtualMachine", moref))
            .await
            .map_err(vc_err)?;
        Ok(DevicesBefore {
            keys: vm.devices.iter().map(|d| d.key).collect(),
            cdroms: vm
                .devices
                .iter()
                .filter(|d| d.is_cdrom())
                .map(|d| (d.key, vc::device_to_stored(d)))
                .collect(),
        })
    }

    async fn set_cdrom_first(&self, moref: &str, _saved: &SavedBoot) -> BResult<()> {
        let vm = self.vmref_named(moref).await?;
        self.client
            .set_boot_cdrom_first(&vm)
            .await
            .map(|_| ())
            .map_err(vc_err)
    }

    async fn detach_isos(&self, moref: &str, attached: &[AttachedCdrom]) -> BResult<()> {
        // Last attached first: a drive added on a controller we added goes before it.
        for a in attached.iter().rev() {
            let att: vc::CdromAttachment = match a.detail.as_deref().map(serde_json::from_str) {
                Some(Ok(att)) => att,
                _ => vc::CdromAttachment {
                    vm: moref.to_string(),
                    vm_moref: moref.to_string(),
                    iso: a.iso.clone(),
                    device_key: a.device_key,
                    added_cdrom: a.added,
                    added_controller_key: None,
                    original: None,
                },
            };
            self.client.remove_added(&att).await.map_err(vc_err)?;
        }
        Ok(())
    }

    async fn restore_boot(&self, moref: &str, saved: &SavedBoot) -> BResult<()> {
        let saved: vc::SavedBootOptions = serde_json::from_str(&saved.0).map_err(|e| {
            BackendError::permanent(format!(
                "saved boot options of VM {moref} are unreadable: {e}"
            ))
        })?;
        self.client
            .restore_boot_options(&Self::vmref(moref), &saved)
            .await
            .map_err(vc_err)
    }
}

/// The DR service's admin API, through the crate's [`AdminClient`] (CA pinned, bearer
/// admin token).
pub struct DrHttp {
    admin: AdminClient,
}

fn admin_err(what: &str, e: AdminError) -> BackendError {
    let transient = e.is_retryable() || matches!(&e, AdminError::Api { status: 429, .. });
    BackendError {
        message: format!("{what}: {e}"),
        transient,
        source: Some(Box::new(e)),
    }
}

impl DrHttp {
    /// `ca_pem`: the DR service CA; system roots are not trusted.
    pub fn new(base: &str, admin_token: &str, ca_pem: &str) -> BResult<Self> {
        let admin = AdminClient::with_ca_pem(base, admin_token, Some(ca_pem.as_bytes()))
            .map_err(|e| admin_err("DR service connection", e))?;
        Ok(Self { admin })
    }
}

#[async_trait]
impl DrService for DrHttp {
    async fn instances(&self) -> BResult<Vec<RecoveryInstance>> {
        self.admin
            .list_instances()
            .await
            .map(|l| l.items)
            .map_err(|e| admin_err("list recovery instances", e))
    }

    async fn instance(&self, id: &str) -> BResult<RecoveryInstance> {
        self.admin
            .describe(id)
            .await
            .map_err(|e| admin_err(&format!("read recovery instance {id}"), e))
    }

    async fn create_pairing_token(&self, id: &str, ttl_secs: u64) -> BResult<String> {
        self.admin
            .create_token(&CreateTokenRequest {
                kind: TokenKind::Pairing,
                recovery_instance_id: Some(id.to_string()),
                ttl_secs: Some(ttl_secs),
            })
            .await
            .map(|r| r.token)
            .map_err(|e| admin_err(&format!("create pairing token for {id}"), e))
    }

    async fn launch(&self, id: &str) -> BResult<()> {
        let r = self
            .admin
            .launch(&[id.to_string()], None)
            .await
            .map_err(|e| admin_err(&format!("launch failback of {id}"), e))?;
        match r.results.iter().find(|x| x.recovery_instance_id == id) {
            Some(x) if x.accepted => Ok(()),
            Some(x) => Err(BackendError::permanent(format!(
                "launch of {id} refused: {}",
                x.reason.as_deref().unwrap_or("no reason given")
            ))),
            None => Err(BackendError::permanent(format!(
                "launch answer does not mention {id}"
            ))),
        }
    }

    async fn stop(&self, id: &str) -> BResult<()> {
        self.admin
            .stop(id)
            .await
            .map(|_| ())
            .map_err(|e| admin_err(&format!("stop failback of {id}"), e))
    }
}

/// Seed ISOs through `failback_iso::seed::build`. The appliance powers off after completion
/// (not reboot): the orchestrator detaches the ISOs and restores the boot order first.
#[derive(Debug, Default)]
pub struct IsoSeedBuilder;

/// The seed a plan entry turns into.
pub fn seed_config(input: &SeedInput) -> SeedConfig {
    let n = &input.network;
    let mut network = seed::NetworkConfig {
        mode: match n.mode {
            NetworkMode::Dhcp => seed::NetMode::Dhcp,
            NetworkMode::Static => seed::NetMode::Static,
        },
        dns: n.dns.iter().filter_map(|d| d.parse().ok()).collect(),
        ..Default::default()
    };
    if let Some(addr) = &n.address {
        let v6 = addr.contains(':');
        if v6 {
            network.ipv6 = Some(seed::StaticV6 {
                address: addr.clone(),
                gateway: n.gateway.as_deref().and_then(|g| g.parse().ok()),
            });
        } else {
            network.ipv4 = Some(seed::StaticV4 {
                address: addr.clone(),
                gateway: n.gateway.as_deref().and_then(|g| g.parse().ok()),
            });
        }
    }
    SeedConfig {
        server_url: Some(input.server_url.clone()),
        token: Some(input.token.clone()),
        instance_id: Some(input.recovery_instance_id.clone()),
        no_prompt: true,
        after: seed::AfterCompletion::Poweroff,
        ca_cert_pem: Some(input.ca_pem.clone()),
        network,
        proxy: n.proxy.as_ref().map(|p| seed::ProxyConfig {
            url: p.clone(),
            no_proxy: vec![],
        }),
        mappings: input
            .device_mapping
            .iter()
            .map(|m| seed::DeviceMapping {
                remote: m.remote.clone(),
                local: m.local.clone(),
            })
            .collect(),
    }
}

impl SeedBuilder for IsoSeedBuilder {
    fn build(&self, input: &SeedInput, out: &Path) -> BResult<()> {
        let cfg = seed_config(input);
        failback_iso::seed::build(&cfg, out)
            .map(|_| ())
            .map_err(|e| {
                BackendError::permanent(format!(
                    "seed ISO {} for VM {} (instance {}): {e}",
                    out.display(),
                    input.vm_name,
                    input.recovery_instance_id
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use failback_config::plan::{DeviceMap, Network};

    fn input(network: Network) -> SeedInput {
        SeedInput {
            server_url: "https://10.0.2.2:8443".into(),
            ca_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            token: "tok".into(),
            recovery_instance_id: "i-0123456789abcdef".into(),
            network,
            device_mapping: vec![DeviceMap {
                remote: "vol-1".into(),
                local: "/dev/sda".into(),
            }],
            vm_name: "web-01".into(),
        }
    }

    #[test]
    fn plan_network_becomes_a_complete_unattended_seed() {
        let cfg = seed_config(&input(Network {
            mode: NetworkMode::Static,
            address: Some("192.168.1.10/24".into()),
            gateway: Some("192.168.1.1".into()),
            dns: vec!["192.168.1.2".into()],
            proxy: Some("http://proxy:3128".into()),
        }));
        assert!(cfg.no_prompt);
        assert_eq!(cfg.after, seed::AfterCompletion::Poweroff);
        assert_eq!(cfg.network.mode, seed::NetMode::Static);
        assert_eq!(
            cfg.network.ipv4.as_ref().unwrap().address,
            "192.168.1.10/24"
        );
        assert_eq!(cfg.mappings.len(), 1);
        assert_eq!(cfg.proxy.as_ref().unwrap().url, "http://proxy:3128");
        cfg.validate(seed::Completeness::Complete).unwrap();

        let v6 = seed_config(&input(Network {
            mode: NetworkMode::Static,
            address: Some("fd00::5/64".into()),
            gateway: Some("fd00::1".into()),
            ..Default::default()
        }));
        assert!(v6.network.ipv4.is_none());
        assert_eq!(v6.network.ipv6.as_ref().unwrap().address, "fd00::5/64");
        v6.validate(seed::Completeness::Complete).unwrap();

        let dhcp = seed_config(&input(Network::default()));
        assert_eq!(dhcp.network.mode, seed::NetMode::Dhcp);
        dhcp.validate(seed::Completeness::Complete).unwrap();
    }

    #[test]
    fn seed_iso_builds_with_label() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("seed.iso");
        IsoSeedBuilder
            .build(&input(Network::default()), &out)
            .unwrap();
        assert_eq!(
            failback_iso::seed::read_label(&out).unwrap().as_deref(),
            Some(seed::SEED_LABEL)
        );
    }
}

#[cfg(test)]
mod power_tests {
    use super::*;

    fn refused(requested: &str, existing: &str) -> vc::Result<()> {
        Err(vc::Error::TaskFailed {
            what: "power off VM 'vm1'".into(),
            task: "task-1".into(),
            fault: Box::new(vc::Fault {
                kind: vc::FaultKind::InvalidPowerState {
                    requested: Some(requested.into()),
                    existing: Some(existing.into()),
                },
                message: String::new(),
            }),
        })
    }

    #[test]
    fn a_vm_already_in_the_requested_power_state_is_success() {
        assert!(already_there(refused("poweredOff", "poweredOff")).is_ok());
        assert!(already_there(refused("poweredOn", "poweredOn")).is_ok());
        assert!(already_there(refused("poweredOn", "suspended")).is_err());
        assert!(already_there(Ok(())).is_ok());
    }
}
