//! All-or-nothing changes to the tree that survive a crash at any instant: an undo journal.
//!
//! `apply` and `revert` hand [`commit`] every change they make (files written or removed,
//! folders created or removed). Before the first change reaches the tree, the journal folder
//! `sglang/.kvtuner-patch-journal/` holds a copy of every file about to be replaced or removed
//! (`pre/N`) and then `intent.json`, naming every target, the temporary file each write goes
//! through and the folders to create or remove; all of it is fsynced, and only then does the
//! first rename happen. When every change is in place and fsynced, `intent.json` is removed: that
//! removal is the commit point. The journal folder is then cleared.
//!
//! Every command starts with [`recover`] (under the tree lock): a journal whose `intent.json`
//! exists belongs to an operation that was interrupted, and is rolled back - temporary files
//! removed, every target given back its saved bytes, mode and owner (or removed when the
//! operation created it), created folders removed and removed ones recreated - so the tree is
//! exactly as it was before that operation; the command then does its own work from there. A
//! journal folder without `intent.json` was interrupted before it touched anything and is just
//! removed. Rolling back is itself idempotent, so a crash during recovery is recovered by the
//! next run. `status` reports a journal as an interrupted operation.
//!
//! The journal is read from the tree, so it is untrusted like the manifest: its paths must pass
//! [`crate::safe_path::inside`] and each temporary file must be the one the tool derives for its
//! target, or recovery refuses to act.

use crate::safe_path;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The journal folder, relative to the folder holding `sglang/`.
pub const JOURNAL_DIR: &str = "sglang/.kvtuner-patch-journal";
const INTENT: &str = "intent.json";

/// One change to a file, its path relative to the folder holding `sglang/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Create or replace `rel` with `bytes`; `mode` for a new file (an existing file keeps its
    /// own mode and owner).
    Write {
        rel: String,
        bytes: Vec<u8>,
        mode: Option<u32>,
    },
    /// Remove the file `rel` (nothing happens if it is already gone).
    Remove { rel: String },
}

impl Change {
    pub fn rel(&self) -> &str {
        match self {
            Change::Write { rel, .. } | Change::Remove { rel } => rel,
        }
    }
}

/// Everything one operation changes, committed together by [`commit`].
#[derive(Debug, Default, Clone)]
pub struct Transaction {
    /// `apply` or `revert`, for the journal and `status`.
    pub operation: String,
    pub changes: Vec<Change>,
    /// Folders to create before the writes (parents before children).
    pub create_dirs: Vec<String>,
    /// Folders to remove after the writes, if they are empty then (children before parents).
    pub remove_dirs: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    rel: String,
    /// The file existed before the operation: its bytes are in `pre/<index>`.
    existed: bool,
    mode: u32,
    uid: u32,
    gid: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct Intent {
    operation: String,
    pid: u32,
    entries: Vec<Entry>,
    /// Folders the operation creates (that did not exist), parents first.
    created_dirs: Vec<String>,
    /// Folders the operation removes, with their modes, children first.
    removed_dirs: Vec<(String, u32)>,
}

/// An operation that did not finish, as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Interrupted {
    pub operation: String,
    pub pid: Option<u32>,
    /// It had begun changing the tree (else only the journal's own folder is left over).
    pub changed_tree: bool,
}

impl Interrupted {
    /// One sentence for `status`.
    pub fn describe(&self) -> String {
        let who = self.pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
        if self.changed_tree {
            format!(
                "an interrupted {}{who} left the tree half-changed; the next apply or revert \
                 first rolls it back to the state before it, then does its own work",
                self.operation
            )
        } else {
            format!(
                "an interrupted {}{who} left its journal folder behind but nothing half-changed; \
                 the next apply or revert removes it",
                self.operation
            )
        }
    }
}

/// The temporary file a write of `rel` goes through: beside it, so the rename stays on one
/// file system, and derived from it, so a journal cannot name any other file.
pub fn temp_of(rel: &str) -> String {
    match rel.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/.kvtuner-patch-tmp.{name}"),
        None => format!(".kvtuner-patch-tmp.{rel}"),
    }
}

fn checked(base: &Path, rel: &str) -> Result<PathBuf> {
    safe_path::inside(base, rel).map_err(|p| anyhow::anyhow!("{rel} {p}"))
}

/// What the journal says, if there is one.
pub fn interrupted(base: &Path) -> Option<Interrupted> {
    let dir = base.join(JOURNAL_DIR);
    fs::symlink_metadata(&dir).ok()?;
    let intent: Option<Intent> = fs::read(dir.join(INTENT))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    Some(match intent {
        Some(i) => Interrupted {
            operation: i.operation,
            pid: Some(i.pid),
            changed_tree: true,
        },
        None => Interrupted {
            operation: "operation".into(),
            pid: None,
            changed_tree: dir.join(INTENT).exists(),
        },
    })
}

/// Undo an interrupted operation, if the journal holds one. Call with the tree lock held.
/// Returns what was found (for the report), `None` when there was no journal.
pub fn recover(base: &Path) -> Result<Option<Interrupted>> {
    let found = interrupted(base);
    if found.is_none() {
        return Ok(None);
    }
    let dir = checked(base, JOURNAL_DIR)?;
    let intent_path = dir.join(INTENT);
    if intent_path.exists() {
        let bytes = fs::read(&intent_path)
            .with_context(|| format!("reading the journal {}", intent_path.display()))?;
        let intent: Intent = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not a journal this tool wrote; refusing to act on it",
                intent_path.display()
            )
        })?;
        roll_back(base, &dir, &intent)?;
        remove_synced(&intent_path)?;
    }
    clear_journal(&dir)?;
    Ok(found)
}

fn roll_back(base: &Path, dir: &Path, intent: &Intent) -> Result<()> {
    // Check every path before touching any.
    for e in &intent.entries {
        checked(base, &e.rel)?;
        checked(base, &temp_of(&e.rel))?;
    }
    for d in intent
        .created_dirs
        .iter()
        .chain(intent.removed_dirs.iter().map(|(d, _)| d))
    {
        checked(base, d)?;
    }
    let mut touched = BTreeSet::new();
    for e in &intent.entries {
        remove_if_present(&base.join(temp_of(&e.rel)))?;
    }
    for (d, mode) in intent.removed_dirs.iter().rev() {
        let path = base.join(d);
        if !path.exists() {
            fs::create_dir(&path).with_context(|| format!("recreating {d}"))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode))?;
        }
        touched.insert(parent_of(&path));
    }
    for (i, e) in intent.entries.iter().enumerate() {
        let target = base.join(&e.rel);
        if e.existed {
            let pre = fs::read(dir.join("pre").join(i.to_string()))
                .with_context(|| format!("the journal's saved copy of {} is missing", e.rel))?;
            write_through_temp(base, &e.rel, &pre, e.mode, Some((e.uid, e.gid)))?;
        } else {
            remove_if_present(&target)?;
        }
        touched.insert(parent_of(&target));
    }
    for d in intent.created_dirs.iter().rev() {
        let path = base.join(d);
        if path.is_dir() {
            fs::remove_dir(&path).with_context(|| format!("removing {d}"))?;
        }
        touched.insert(parent_of(&path));
    }
    sync_dirs(&touched)
}

/// Make every change of `txn` or none: journal first, then the changes, then the commit point.
/// The caller holds the tree lock and has run [`recover`]. Returns the folders of
/// `txn.remove_dirs` that were removed (a folder that is not empty then is kept: what is in it
/// is not ours).
pub fn commit(base: &Path, txn: &Transaction) -> Result<Vec<String>> {
    preflight(base, txn)?;
    let dir = base.join(JOURNAL_DIR);
    clear_journal(&dir)?;
    fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::create_dir(dir.join("pre"))?;

    let mut entries = Vec::new();
    for (i, change) in txn.changes.iter().enumerate() {
        let path = base.join(change.rel());
        let (existed, mode, uid, gid) = match fs::symlink_metadata(&path) {
            Ok(m) => {
                write_synced(
                    &dir.join("pre").join(i.to_string()),
                    &fs::read(&path)?,
                    0o600,
                )?;
                (true, m.mode() & 0o7777, m.uid(), m.gid())
            }
            Err(_) => {
                let mode = match change {
                    Change::Write { mode, .. } => mode.unwrap_or(0o644),
                    Change::Remove { .. } => 0o644,
                };
                (false, mode, 0, 0)
            }
        };
        entries.push(Entry {
            rel: change.rel().to_string(),
            existed,
            mode,
            uid,
            gid,
        });
    }
    let created_dirs: Vec<String> = txn
        .create_dirs
        .iter()
        .filter(|d| !base.join(d).exists())
        .cloned()
        .collect();
    let mut removed_dirs = Vec::new();
    for d in &txn.remove_dirs {
        if let Ok(m) = fs::symlink_metadata(base.join(d)) {
            removed_dirs.push((d.clone(), m.mode() & 0o7777));
        }
    }
    let intent = Intent {
        operation: txn.operation.clone(),
        pid: std::process::id(),
        entries,
        created_dirs,
        removed_dirs,
    };
    sync_dir(&dir.join("pre"))?;
    let tmp = dir.join("intent.json.tmp");
    write_synced(&tmp, &serde_json::to_vec_pretty(&intent)?, 0o600)?;
    fs::rename(&tmp, dir.join(INTENT))?;
    sync_dir(&dir)?;

    // From here on the journal can undo everything.
    let mut touched = BTreeSet::new();
    for d in &intent.created_dirs {
        fs::create_dir(base.join(d)).with_context(|| format!("creating {d}"))?;
        touched.insert(parent_of(&base.join(d)));
    }
    for (change, entry) in txn.changes.iter().zip(&intent.entries) {
        let path = base.join(change.rel());
        match change {
            Change::Write { rel, bytes, .. } => {
                let owner = entry.existed.then_some((entry.uid, entry.gid));
                write_through_temp(base, rel, bytes, entry.mode, owner)?;
            }
            Change::Remove { .. } => remove_if_present(&path)?,
        }
        touched.insert(parent_of(&path));
    }
    let mut removed = Vec::new();
    for (d, _) in &intent.removed_dirs {
        let path = base.join(d);
        match fs::remove_dir(&path) {
            Ok(()) => removed.push(d.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {}
            Err(e) => return Err(e).with_context(|| format!("removing the folder {d}")),
        }
        touched.insert(parent_of(&path));
    }
    sync_dirs(&touched)?;
    remove_synced(&dir.join(INTENT))?;
    clear_journal(&dir)?;
    Ok(removed)
}

/// Everything that can be checked before writing: safe paths, regular targets, permissions.
fn preflight(base: &Path, txn: &Transaction) -> Result<()> {
    let mut problems = Vec::new();
    let mut rels: Vec<&str> = txn.changes.iter().map(Change::rel).collect();
    rels.extend(txn.create_dirs.iter().map(String::as_str));
    rels.extend(txn.remove_dirs.iter().map(String::as_str));
    rels.push(JOURNAL_DIR);
    for rel in &rels {
        if let Err(p) = safe_path::inside(base, rel) {
            problems.push(format!("{rel} {p}"));
        }
    }
    if problems.is_empty() {
        for change in &txn.changes {
            let path = base.join(change.rel());
            if let Ok(m) = fs::symlink_metadata(&path) {
                if !m.is_file() {
                    problems.push(format!("{} is not a regular file", change.rel()));
                } else if !writable(&path) {
                    problems.push(format!("{} is not writable", change.rel()));
                }
            }
            if let Some(dir) = nearest_existing_parent(base, change.rel()) {
                if !writable(&base.join(&dir)) {
                    problems.push(format!("the folder {dir} is not writable"));
                }
            }
        }
        for rel in txn
            .create_dirs
            .iter()
            .chain(&txn.remove_dirs)
            .map(String::as_str)
        {
            if let Some(dir) = nearest_existing_parent(base, rel) {
                if !writable(&base.join(&dir)) {
                    problems.push(format!("the folder {dir} is not writable"));
                }
            }
        }
        if !writable(&base.join("sglang")) {
            problems.push("the folder sglang (where the journal goes) is not writable".into());
        }
    }
    problems.sort();
    problems.dedup();
    if !problems.is_empty() {
        bail!(
            "refusing to write: nothing was changed\n{}",
            problems
                .iter()
                .map(|p| format!("  - {p}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(())
}

/// The deepest existing folder above `rel` (relative to `base`), `""` being `base` itself.
fn nearest_existing_parent(base: &Path, rel: &str) -> Option<String> {
    let mut cur = rel.trim_end_matches('/');
    while let Some((parent, _)) = cur.rsplit_once('/') {
        if base.join(parent).is_dir() {
            return Some(parent.to_string());
        }
        cur = parent;
    }
    None
}

fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated path; access() only reads it.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// Write `bytes` to `rel` through its temporary file: written, given `mode` (and `owner` when
/// running as root), fsynced, then renamed over the target.
fn write_through_temp(
    base: &Path,
    rel: &str,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<()> {
    let tmp = base.join(temp_of(rel));
    remove_if_present(&tmp)?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    if let Some((uid, gid)) = owner {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
    }
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, base.join(rel)).with_context(|| format!("replacing {rel}"))?;
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn remove_synced(path: &Path) -> Result<()> {
    remove_if_present(path)?;
    sync_dir(&parent_of(path))
}

/// Remove the journal folder and what is in it (only the tool's own files are ever there).
fn clear_journal(dir: &Path) -> Result<()> {
    match fs::symlink_metadata(dir) {
        Err(_) => return Ok(()),
        Ok(m) if !m.is_dir() => bail!("{} is not a folder; refusing to touch it", dir.display()),
        Ok(_) => {}
    }
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    sync_dir(&parent_of(dir))
}

fn parent_of(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

fn sync_dirs(dirs: &BTreeSet<PathBuf>) -> Result<()> {
    dirs.iter()
        .filter(|d| d.is_dir())
        .try_for_each(|d| sync_dir(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("sglang/srt")).unwrap();
        fs::write(t.path().join("sglang/srt/a.py"), b"a = 1\n").unwrap();
        fs::write(t.path().join("sglang/srt/gone.py"), b"g = 1\n").unwrap();
        t
    }

    fn txn() -> Transaction {
        Transaction {
            operation: "apply".into(),
            changes: vec![
                Change::Write {
                    rel: "sglang/srt/a.py".into(),
                    bytes: b"a = 2\n".to_vec(),
                    mode: None,
                },
                Change::Write {
                    rel: "sglang/srt/new/b.py".into(),
                    bytes: b"b = 1\n".to_vec(),
                    mode: Some(0o644),
                },
                Change::Remove {
                    rel: "sglang/srt/gone.py".into(),
                },
            ],
            create_dirs: vec!["sglang/srt/new".into()],
            remove_dirs: vec![],
        }
    }

    #[test]
    fn commit_makes_every_change_and_leaves_no_journal() {
        let t = tree();
        commit(t.path(), &txn()).unwrap();
        assert_eq!(
            fs::read(t.path().join("sglang/srt/a.py")).unwrap(),
            b"a = 2\n"
        );
        assert_eq!(
            fs::read(t.path().join("sglang/srt/new/b.py")).unwrap(),
            b"b = 1\n"
        );
        assert!(!t.path().join("sglang/srt/gone.py").exists());
        assert!(!t.path().join(JOURNAL_DIR).exists());
        assert_eq!(interrupted(t.path()), None);
    }

    #[test]
    fn a_journal_left_with_its_intent_is_rolled_back_exactly() {
        let t = tree();
        let before: Vec<_> = ["a.py", "gone.py"]
            .iter()
            .map(|f| fs::read(t.path().join("sglang/srt").join(f)).unwrap())
            .collect();
        commit(t.path(), &txn()).unwrap();
        // Recreate what a crash right after the last rename leaves: the intent still there.
        let t2 = tree();
        let dir = t2.path().join(JOURNAL_DIR);
        fs::create_dir_all(dir.join("pre")).unwrap();
        fs::write(dir.join("pre/0"), b"a = 1\n").unwrap();
        fs::write(dir.join("pre/2"), b"g = 1\n").unwrap();
        let intent = Intent {
            operation: "apply".into(),
            pid: 1,
            entries: vec![
                Entry {
                    rel: "sglang/srt/a.py".into(),
                    existed: true,
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                },
                Entry {
                    rel: "sglang/srt/new/b.py".into(),
                    existed: false,
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                },
                Entry {
                    rel: "sglang/srt/gone.py".into(),
                    existed: true,
                    mode: 0o600,
                    uid: 0,
                    gid: 0,
                },
            ],
            created_dirs: vec!["sglang/srt/new".into()],
            removed_dirs: vec![],
        };
        fs::write(dir.join(INTENT), serde_json::to_vec(&intent).unwrap()).unwrap();
        fs::write(t2.path().join("sglang/srt/a.py"), b"a = 2\n").unwrap();
        fs::create_dir(t2.path().join("sglang/srt/new")).unwrap();
        fs::write(t2.path().join("sglang/srt/new/b.py"), b"b").unwrap();
        fs::write(
            t2.path().join("sglang/srt/new/.kvtuner-patch-tmp.b.py"),
            b"half",
        )
        .unwrap();
        fs::remove_file(t2.path().join("sglang/srt/gone.py")).unwrap();
        assert!(interrupted(t2.path()).unwrap().changed_tree);

        let found = recover(t2.path()).unwrap().unwrap();
        assert_eq!(found.operation, "apply");
        assert_eq!(
            fs::read(t2.path().join("sglang/srt/a.py")).unwrap(),
            before[0]
        );
        assert_eq!(
            fs::read(t2.path().join("sglang/srt/gone.py")).unwrap(),
            before[1]
        );
        let mode = fs::metadata(t2.path().join("sglang/srt/gone.py"))
            .unwrap()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!t2.path().join("sglang/srt/new").exists());
        assert!(!t2.path().join(JOURNAL_DIR).exists());
        assert_eq!(recover(t2.path()).unwrap(), None);
    }

    #[test]
    fn a_journal_naming_paths_outside_the_tree_is_refused() {
        let t = tree();
        let dir = t.path().join(JOURNAL_DIR);
        fs::create_dir_all(&dir).unwrap();
        let intent = Intent {
            operation: "apply".into(),
            pid: 1,
            entries: vec![Entry {
                rel: "../victim".into(),
                existed: false,
                mode: 0,
                uid: 0,
                gid: 0,
            }],
            created_dirs: vec![],
            removed_dirs: vec![],
        };
        fs::write(dir.join(INTENT), serde_json::to_vec(&intent).unwrap()).unwrap();
        let err = recover(t.path()).unwrap_err().to_string();
        assert!(err.contains("../victim"), "{err}");
    }

    #[test]
    fn unsafe_or_unwritable_targets_are_refused_before_any_write() {
        let t = tree();
        let mut bad = txn();
        bad.changes.push(Change::Remove {
            rel: "../outside".into(),
        });
        let err = commit(t.path(), &bad).unwrap_err().to_string();
        assert!(
            err.contains("../outside") && err.contains("nothing was changed"),
            "{err}"
        );
        assert_eq!(
            fs::read(t.path().join("sglang/srt/a.py")).unwrap(),
            b"a = 1\n"
        );
        assert!(!t.path().join(JOURNAL_DIR).exists());
    }
}
