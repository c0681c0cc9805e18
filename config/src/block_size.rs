//! The sync block size rule, in one place: the replication engine checks every round with it
//! and the DR service checks `--block-size` with it at start, so the service can never hand
//! clients a size the engine refuses.

/// Smallest block size.
pub const MIN_BLOCK_SIZE: u32 = 4096;
/// Largest block size.
pub const MAX_BLOCK_SIZE: u32 = 4 * 1024 * 1024;

/// Checks a block size: a power of two in 4 KiB..=4 MiB.
pub fn validate_block_size(bs: u64) -> Result<u32, String> {
    match u32::try_from(bs) {
        Ok(b) if b.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&b) => Ok(b),
        _ => Err(format!(
            "block size {bs} must be a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
        )),
    }
}

/// `validate_block_size` for clap's `value_parser` (plain bytes).
pub fn parse_block_size(s: &str) -> Result<u64, String> {
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("block size {s:?} is not a number of bytes"))?;
    validate_block_size(n).map(u64::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_powers_of_two_from_4k_to_4m() {
        for ok in [4096u64, 65536, 131072, 4 << 20] {
            assert_eq!(validate_block_size(ok), Ok(u32::try_from(ok).unwrap()));
        }
        for bad in [0u64, 512, 12288, 3 << 20, 8 << 20, 1 << 40] {
            assert!(validate_block_size(bad).is_err(), "{bad}");
        }
        assert!(parse_block_size("12288")
            .unwrap_err()
            .contains("power of two"));
        assert_eq!(parse_block_size("131072"), Ok(131072));
    }
}
