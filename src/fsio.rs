//! File I/O the commands share: atomic replacement and content hashes.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Write;
use std::path::Path;

/// Hex sha256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of `path`, `None` if it does not exist (any other error is one).
pub fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// sha256 of the file at `path`, `None` if it does not exist.
pub fn sha256_of_file(path: &Path) -> Result<Option<String>> {
    Ok(read_if_exists(path)?.map(|b| sha256(&b)))
}

/// Write `bytes` to `path` via a temporary file in the same folder and a rename, so readers
/// see the old or the new content, never a mix. Keeps the mode of the file it replaces
/// (or uses `mode_from`'s, or 0644 for new files).
pub fn write_atomic(path: &Path, bytes: &[u8], mode_from: Option<&Path>) -> Result<()> {
    let dir = path.parent().context("path without a parent folder")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let perms = fs::metadata(path)
        .or_else(|_| mode_from.map_or_else(|| Err(std::io::Error::other("none")), fs::metadata))
        .map(|m| m.permissions())
        .ok();
    let mut tmp = tempfile::Builder::new()
        .prefix(".kvtuner-patch-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    let perms = perms.unwrap_or_else(|| {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::Permissions::from_mode(0o644)
        }
        #[cfg(not(unix))]
        {
            tmp.as_file()
                .metadata()
                .expect("temp file metadata")
                .permissions()
        }
    });
    fs::set_permissions(tmp.path(), perms)?;
    tmp.persist(path)
        .with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}
