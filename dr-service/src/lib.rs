//! The DR service: pairing, certificate authority, failback state machine and admin API,
//! with its state in SQLite.
