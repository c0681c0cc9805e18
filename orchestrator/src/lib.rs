//! Mass failback orchestration and the library behind the `failback` admin CLI.
pub mod mass;
