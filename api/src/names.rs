//! Names that two programs must agree on, each defined once and gathered here.
//!
//! - Certificate names live in `failback-trust` (its verifiers check them): the agent's DNS
//!   name, the role and instance URI prefixes.
//! - Media labels live in `failback-config::seed` (the ISO builder writes them, the appliance
//!   looks for them; neither should link an HTTP client for that).

pub use failback_config::seed::{APPLIANCE_LABEL, SEED_LABEL};
pub use failback_trust::identity::{AGENT_SERVER_NAME, INSTANCE_URI_PREFIX, ROLE_URI_PREFIX};
