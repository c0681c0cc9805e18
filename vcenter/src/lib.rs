//! A standalone vSphere SOAP (vim25) client: VMs, datastore upload, CD-ROM, boot order,
//! power and snapshots. It knows nothing about failback.
//!
//! SOAP rather than the REST API: vCenter's REST API has no CD-ROM/boot-order coverage on
//! the simulator we test against (vcsim), and SOAP works on every vCenter and ESXi.
//!
//! ```no_run
//! # async fn f() -> failback_vcenter::Result<()> {
//! use failback_vcenter::{Client, Config, VmQuery, PowerOp};
//! let client = Client::connect(Config::from_url("https://user:pass@vc.example/sdk")?).await?;
//! let vm = client.find_vm(&VmQuery::Name("web01".into())).await?;
//! let att = client.attach_iso(&vm.vmref, "datastore1", "isos/failback.iso").await?;
//! let saved = client.set_boot_cdrom_first(&vm.vmref).await?;
//! client.power(&vm.vmref, PowerOp::On).await?;
//! # let _ = (att, saved); Ok(()) }
//! ```

mod boot;
mod cdrom;
mod client;
mod datastore;
mod error;
mod power;
mod property;
mod snapshot;
pub mod tls;
mod vm;
pub mod xml;

pub use boot::{cdrom_first, BootDevice, BootOptionsView, SavedBootOptions};
pub use cdrom::{device_from_stored, device_to_stored, plan_cdrom, CdromAttachment, CdromPlan};
pub use client::{About, Client, Config, MoRef, ServiceContent, SESSION_COOKIE};
pub use datastore::{
    parse_datastore_path, DatastoreInfo, NoProgress, TransferProgress, UploadOptions, UploadReport,
};
pub use error::{Error, Fault, FaultKind, Result};
pub use power::PowerOp;
pub use snapshot::SnapshotInfo;
pub use tls::TlsMode;
pub use vm::{
    normalize_mac, CdromSummary, Device, DiskSummary, PowerState, Vm, VmQuery, VmRef, VmSummary,
};
