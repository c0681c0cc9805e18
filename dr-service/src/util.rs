//! Small helpers: clock, randomness, hashing of secrets.

use sha2::{Digest, Sha256};

/// Unix seconds now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Fills `buf` from the OS CSPRNG. Panics only if the OS has no randomness source, in which
/// case no secret could be generated safely anyway.
pub fn fill_random(buf: &mut [u8]) {
    getrandom::getrandom(buf).expect("OS random number generator unavailable");
}

/// `n` random bytes as lower-case hex.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    fill_random(&mut b);
    hex::encode(b)
}

/// A secret as stored: SHA-256 hex. Tokens are 256-bit random, so no salt/KDF is needed.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.trim().as_bytes()))
}

/// A new AWS-style recovery instance id: `i-` + 17 hex digits.
pub fn new_instance_id() -> String {
    let h = random_hex(9);
    format!("i-{}", &h[..17])
}
