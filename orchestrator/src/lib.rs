//! Mass failback orchestration and the library behind the `failback` admin CLI.
pub mod admin_client;
pub mod mass;
pub mod vcenter_args;
