//! A real vcsim per test (process handling in `failback_tests::vcsim`, shared with the e2e
//! tests), plus this crate's `Config` for it.
#![allow(dead_code)]

use failback_vcenter::{Config, TlsMode};
use std::time::Duration;

/// A running vcsim (killed on drop; datastores in `dir`), with [`Vcsim::config`].
#[derive(Debug)]
pub struct Vcsim(failback_tests::vcsim::Vcsim);

impl Vcsim {
    /// Starts vcsim with extra launcher flags (e.g. `-tools-running`).
    pub fn start(extra: &[&str]) -> Vcsim {
        Vcsim(failback_tests::vcsim::Vcsim::start(extra))
    }

    /// Settings for this simulator: its self-signed certificate is accepted explicitly.
    pub fn config(&self) -> Config {
        let (url, user, password) = self.0.login();
        let mut c = Config::new(&url, user, password);
        c.tls = TlsMode::Insecure;
        c.task_timeout = Duration::from_secs(120);
        c
    }
}

impl std::ops::Deref for Vcsim {
    type Target = failback_tests::vcsim::Vcsim;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}
