//! Content hashes of files and bytes (writes go through [`crate::journal`]).

use crate::source_file::read_regular;
use anyhow::{anyhow, Result};
use sha2::{Digest, Sha256};
use std::path::Path;

/// Hex sha256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of the regular file at `path`, `None` if nothing is there (a symlink, FIFO or
/// oversized file is an error, never read).
pub fn sha256_of_file(path: &Path) -> Result<Option<String>> {
    let bytes = read_regular(path).map_err(|p| anyhow!("{} {p}", path.display()))?;
    Ok(bytes.map(|b| sha256(&b)))
}
