//! The failback client: the program inside the appliance ISO. It pairs with the DR service,
//! maps local disks to the recovery instance's volumes, pulls the blocks that differ and
//! finalizes the failback.

pub mod appliance;
pub mod exit;
pub mod inventory;
pub mod progress;
pub mod run;
pub mod safety;
pub mod sync_cmd;
