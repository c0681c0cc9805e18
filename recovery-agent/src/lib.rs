//! The recovery agent: runs on the recovery instance and serves its disks read-only to a
//! paired failback client.
