//! Helpers for end-to-end tests that run the real binaries (server, agent, client), vcsim
//! and QEMU on 127.0.0.1.
