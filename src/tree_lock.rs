//! One writer at a time: an exclusive `flock` on the `sglang/` package folder itself.
//!
//! Locking the folder (not a lock file) leaves nothing behind in the tree, so a reverted tree
//! stays byte-identical, and the kernel drops the lock when the holder dies, even by SIGKILL.
//! A second `apply` or `revert` does not wait: it exits 2 naming the holder, found in
//! `/proc/locks`, so the user knows which process to wait for.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Held while the value lives.
pub struct TreeLock {
    _folder: File,
}

/// Take the lock on `package_dir`, or say who holds it.
pub fn lock(package_dir: &Path) -> Result<TreeLock, String> {
    let folder = File::open(package_dir)
        .map_err(|e| format!("cannot open {} to lock it: {e}", package_dir.display()))?;
    match folder.try_lock() {
        Ok(()) => Ok(TreeLock { _folder: folder }),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "another process is changing this tree ({}); run again when it has finished",
            holder(package_dir).unwrap_or_else(|| "its pid could not be read".into())
        )),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(format!("cannot lock {}: {e}", package_dir.display()))
        }
    }
}

/// `pid N: command line` of the process holding a `flock` on `path`, from `/proc/locks`.
fn holder(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let (ino, dev) = (meta.ino(), meta.dev());
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" (device numbers in hex)
    let pid = locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (kind, pid, id) = (f.get(1)?, f.get(4)?, f.get(5)?);
        let mut id = id.split(':');
        let ma = u32::from_str_radix(id.next()?, 16).ok()?;
        let mi = u32::from_str_radix(id.next()?, 16).ok()?;
        let i: u64 = id.next()?.parse().ok()?;
        (*kind == "FLOCK" && ma == major && mi == minor && i == ino).then(|| pid.to_string())
    })?;
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
    Some(format!("pid {pid}: {}", cmd.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_freed_on_drop() {
        let t = tempfile::tempdir().unwrap();
        let held = lock(t.path()).unwrap();
        let err = lock(t.path()).err().expect("second lock refused");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(held);
        lock(t.path()).expect("free again after drop");
    }
}
