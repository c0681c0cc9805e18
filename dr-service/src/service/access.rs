//! Credential checks the transport makes before it reads a large request body.

use super::{Service, R};

impl Service {
    /// Ok when `secret` is a client secret this service issued (401 otherwise); lets the
    /// log upload route refuse strangers before reading megabytes.
    pub fn check_client_secret(&self, secret: &str) -> R<()> {
        self.client(secret).map(|_| ())
    }
}
