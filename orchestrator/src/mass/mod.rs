//! Mass failback (`failback mass find|plan|run`): fail back hundreds of vCenter VMs at once.
//!
//! Per VM: pairing token -> seed ISO -> upload -> power off -> protective snapshot -> CD-ROMs,
//! ISOs, boot order -> appliance boots and pairs -> ready -> launch -> completed -> ISOs out,
//! boot options back exactly -> power on from disk. See [`runner`] for the engine and
//! [`state`] for the durable run state behind `--resume`.

pub mod adapters;
pub mod backend;
pub mod matching;
pub mod planner;
pub mod progress;
pub mod results;
pub mod runner;
pub mod state;

#[cfg(test)]
mod tests;
