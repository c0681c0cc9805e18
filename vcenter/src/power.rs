//! Power operations.

use crate::client::{request, Client};
use crate::error::{Error, Result};
use crate::vm::{PowerState, VmRef};
use std::time::{Duration, Instant};

/// A power operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerOp {
    On,
    Off,
    Reset,
}

impl Client {
    /// Power on / off (hard) / reset, waiting for the task. A VM already in the requested
    /// state gives `TaskFailed` with `FaultKind::InvalidPowerState`.
    pub async fn power(&self, vm: &VmRef, op: PowerOp) -> Result<()> {
        let (method, what) = match op {
            PowerOp::On => ("PowerOnVM_Task", "power on"),
            PowerOp::Off => ("PowerOffVM_Task", "power off"),
            PowerOp::Reset => ("ResetVM_Task", "reset"),
        };
        self.run_task(&format!("{what} VM {vm}"), &request(method, &vm.moref, ""))
            .await
            .map(|_| ())
    }

    pub async fn power_state(&self, vm: &VmRef) -> Result<PowerState> {
        let oc = self
            .retrieve_one(
                &format!("read power state of VM {vm}"),
                &vm.moref,
                &["runtime.powerState"],
            )
            .await?;
        Ok(PowerState::parse(
            oc.text("runtime.powerState").unwrap_or(""),
        ))
    }

    /// Asks the guest OS to shut down (needs VMware Tools running) and waits up to `wait`
    /// for the VM to be powered off.
    pub async fn shutdown_guest(&self, vm: &VmRef, wait: Duration) -> Result<()> {
        let what = format!("guest shutdown of VM {vm}");
        let oc = self
            .retrieve_one(&what, &vm.moref, &["guest.toolsRunningStatus"])
            .await?;
        let status = oc.text("guest.toolsRunningStatus").unwrap_or("unknown");
        if status != "guestToolsRunning" {
            return Err(Error::ToolsNotRunning {
                vm: vm.to_string(),
                status: status.to_string(),
            });
        }
        self.call(&what, &request("ShutdownGuest", &vm.moref, ""))
            .await?;
        let start = Instant::now();
        loop {
            let state = self.power_state(vm).await?;
            if state == PowerState::PoweredOff {
                return Ok(());
            }
            if start.elapsed() >= wait {
                return Err(Error::TaskTimeout {
                    what,
                    task: "ShutdownGuest".into(),
                    state: state.to_string(),
                    waited: start.elapsed(),
                });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Guest shutdown when tools run, else (or if the guest does not stop in `wait`) hard
    /// power off. Returns true when the guest shut down by itself.
    pub async fn shutdown_or_power_off(&self, vm: &VmRef, wait: Duration) -> Result<bool> {
        match self.shutdown_guest(vm, wait).await {
            Ok(()) => Ok(true),
            Err(Error::ToolsNotRunning { .. }) | Err(Error::TaskTimeout { .. }) => {
                if self.power_state(vm).await? != PowerState::PoweredOff {
                    self.power(vm, PowerOp::Off).await?;
                }
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}
