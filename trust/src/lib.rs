//! The trust model shared by every failback process: certificate roles and instance scope,
//! role-checking TLS verifiers, PEM parsing, and TLS failure causes. Light on purpose (rustls,
//! x509-parser, sha2): the appliance client links it. Certificate *issuing* (rcgen) is only in
//! the `dev-ca` feature and in the DR service.

pub mod cause;
#[cfg(feature = "dev-ca")]
pub mod dev;
pub mod identity;
pub mod pem;
pub mod verify;

pub use cause::{describe, tls_cause, TlsCause};
pub use identity::{
    instance_uri, Identity, IdentityError, Role, AGENT_SERVER_NAME, INSTANCE_URI_PREFIX,
    ROLE_URI_PREFIX,
};
pub use verify::{service_client_config, RoleClientVerifier, RoleServerVerifier, VerifyError};
