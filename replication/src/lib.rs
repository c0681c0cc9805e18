//! Versioned wire protocol and the block-sync engine shared by the client and the recovery agent.
