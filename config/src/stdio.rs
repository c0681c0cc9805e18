//! A closed stdout or stderr ends a process quietly instead of panicking.
//!
//! Rust ignores SIGPIPE, so a write to a pipe whose reader has gone (`failback-client run |
//! head -1`) fails with EPIPE, and `println!`/`eprintln!` turn that into a panic (exit 101
//! and a panic message). Every binary calls [`exit_quietly_on_broken_pipe`] first thing in
//! `main`: that one panic becomes a silent exit with [`BROKEN_PIPE_EXIT`]; every other panic
//! still reaches the default hook. (Restoring SIGPIPE's default action would need `unsafe`.)

/// Exit code after stdout or stderr was closed by its reader: 141 = 128 + SIGPIPE, what a
/// shell reports for a program that the signal ended (`yes | head -1`).
pub const BROKEN_PIPE_EXIT: i32 = 141;

/// Installs the panic hook described in the module docs (call once, at the top of `main`).
pub fn exit_quietly_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied());
        if msg.is_some_and(is_broken_pipe_panic) {
            std::process::exit(BROKEN_PIPE_EXIT);
        }
        default(info);
    }));
}

/// Whether `msg` is the panic of std's print macros on EPIPE, e.g.
/// `failed printing to stdout: Broken pipe (os error 32)`.
pub fn is_broken_pipe_panic(msg: &str) -> bool {
    const EPIPE: i32 = 32; // Linux, every architecture
    let cause = std::io::Error::from_raw_os_error(EPIPE).to_string();
    (msg.starts_with("failed printing to stdout:") || msg.starts_with("failed printing to stderr:"))
        && msg.ends_with(&cause)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_the_print_macros_epipe_panic() {
        let epipe = std::io::Error::from_raw_os_error(32);
        assert!(is_broken_pipe_panic(&format!(
            "failed printing to stdout: {epipe}"
        )));
        assert!(is_broken_pipe_panic(&format!(
            "failed printing to stderr: {epipe}"
        )));
        let other = std::io::Error::from_raw_os_error(28); // ENOSPC
        assert!(!is_broken_pipe_panic(&format!(
            "failed printing to stdout: {other}"
        )));
        assert!(!is_broken_pipe_panic(&format!(
            "index out of bounds: {epipe}"
        )));
    }
}
