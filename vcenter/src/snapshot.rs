//! Snapshots (a protective snapshot before failback overwrites disks).

use crate::client::{request, Client, MoRef};
use crate::error::{Error, Result};
use crate::vm::VmRef;
use crate::xml::{escape, Element};
use serde::{Deserialize, Serialize};

/// A snapshot in the VM's tree (flattened, parents first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub description: String,
    pub moref: MoRef,
    pub create_time: Option<String>,
    /// Names from the root to this snapshot.
    pub path: Vec<String>,
    pub current: bool,
}

fn flatten(list: &Element, parent: &[String], current: Option<&str>, out: &mut Vec<SnapshotInfo>) {
    for node in list
        .children_named("rootSnapshotList")
        .chain(list.children_named("childSnapshotList"))
    {
        let Some(moref) = node.child("snapshot").and_then(MoRef::from_element) else {
            continue;
        };
        let name = node.text_of("name").unwrap_or_default().to_string();
        let mut path = parent.to_vec();
        path.push(name.clone());
        out.push(SnapshotInfo {
            description: node.text_of("description").unwrap_or_default().to_string(),
            create_time: node.text_of("createTime").map(str::to_string),
            current: current == Some(moref.value.as_str()),
            moref,
            name,
            path: path.clone(),
        });
        flatten(node, &path, current, out);
    }
}

impl Client {
    /// Every snapshot of the VM.
    pub async fn snapshots(&self, vm: &VmRef) -> Result<Vec<SnapshotInfo>> {
        let oc = self
            .retrieve_one(
                &format!("list snapshots of VM {vm}"),
                &vm.moref,
                &["snapshot"],
            )
            .await?;
        let mut out = Vec::new();
        if let Some(info) = oc.get("snapshot") {
            let current = info
                .child("currentSnapshot")
                .map(|c| c.text.trim().to_string());
            flatten(info, &[], current.as_deref(), &mut out);
        }
        Ok(out)
    }

    /// Creates a snapshot (no memory, no quiescing by default) and returns its reference.
    pub async fn create_snapshot(
        &self,
        vm: &VmRef,
        name: &str,
        description: &str,
        memory: bool,
        quiesce: bool,
    ) -> Result<MoRef> {
        let what = format!("create snapshot '{name}' of VM {vm}");
        let body = request(
            "CreateSnapshot_Task",
            &vm.moref,
            &format!(
                "<name>{}</name><description>{}</description><memory>{memory}</memory><quiesce>{quiesce}</quiesce>",
                escape(name),
                escape(description)
            ),
        );
        let result = self.run_task(&what, &body).await?;
        if let Some(m) = result.as_ref().and_then(MoRef::from_element) {
            return Ok(m);
        }
        Ok(self.find_snapshot(vm, name).await?.moref)
    }

    /// The snapshot with this name (the newest if several share it).
    pub async fn find_snapshot(&self, vm: &VmRef, name: &str) -> Result<SnapshotInfo> {
        let all = self.snapshots(vm).await?;
        all.iter()
            .rev()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| Error::SnapshotNotFound {
                vm: vm.to_string(),
                name: name.to_string(),
                available: all.iter().map(|s| s.name.clone()).collect(),
            })
    }

    /// Reverts the VM to the named snapshot.
    pub async fn revert_snapshot(&self, vm: &VmRef, name: &str) -> Result<()> {
        let snap = self.find_snapshot(vm, name).await?;
        self.revert_to_snapshot(vm, &snap.moref).await
    }

    /// Reverts the VM to the snapshot with this reference (as `create_snapshot` returned it).
    pub async fn revert_to_snapshot(&self, vm: &VmRef, snapshot: &MoRef) -> Result<()> {
        let body = request("RevertToSnapshot_Task", snapshot, "");
        self.run_task(&format!("revert VM {vm} to snapshot {snapshot}"), &body)
            .await
            .map(|_| ())
    }

    /// Removes the snapshot with this reference (children kept); a snapshot no longer in the
    /// VM's tree is not an error (removed earlier, e.g. before a crash).
    pub async fn remove_snapshot_ref(&self, vm: &VmRef, snapshot: &MoRef) -> Result<bool> {
        let all = self.snapshots(vm).await?;
        if !all.iter().any(|s| s.moref.value == snapshot.value) {
            return Ok(false);
        }
        let body = request(
            "RemoveSnapshot_Task",
            snapshot,
            "<removeChildren>false</removeChildren><consolidate>true</consolidate>",
        );
        self.run_task(&format!("remove snapshot {snapshot} of VM {vm}"), &body)
            .await
            .map(|_| true)
    }

    /// Removes the named snapshot (its children are kept unless `remove_children`).
    pub async fn remove_snapshot(
        &self,
        vm: &VmRef,
        name: &str,
        remove_children: bool,
    ) -> Result<()> {
        let snap = self.find_snapshot(vm, name).await?;
        let body = request(
            "RemoveSnapshot_Task",
            &snap.moref,
            &format!(
                "<removeChildren>{remove_children}</removeChildren><consolidate>true</consolidate>"
            ),
        );
        self.run_task(&format!("remove snapshot '{name}' of VM {vm}"), &body)
            .await
            .map(|_| ())
    }
}
