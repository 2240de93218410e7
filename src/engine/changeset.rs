//! All-or-nothing changes: build every new file text in memory, check each one, then write.
//!
//! 1. Edits of all patches (of all groups) are grouped per file and applied to the original
//!    text in one go (`edit::apply_edits`; overlap is an error): a [`ChangeSet`].
//! 2. Every result is re-parsed with tree-sitter (no ERROR/MISSING node) *and* compiled by
//!    CPython (tree-sitter accepts inconsistent indentation; the interpreter does not).
//! 3. Only then is anything written, by [`commit`], the one write path `apply` and `revert`
//!    share: a list of [`FileWrite`]s and what happens to the manifest ([`Record`]): for
//!    apply, originals and manifest first, then each file through a temporary file and a
//!    rename in its own folder. If a write fails, files already written are put back (best
//!    effort) and the previous manifest restored.

use crate::engine::anchor::PatchEdit;
use crate::engine::diff;
use crate::engine::edit::{apply_edits, Edit};
use crate::engine::manifest::{FileRecord, Manifest};
use crate::engine::python::Python;
use crate::engine::sources::Sources;
use crate::engine::syntax::PyFile;
use crate::fsio::{read_if_exists, sha256, write_atomic};
use crate::refusal::Refusal;
use crate::sglang_tree::SglangTree;
use anyhow::{anyhow, Context, Result};
use std::collections::BTreeMap;
use std::fs;

/// One file's new content.
#[derive(Debug, Clone)]
pub struct FileChange {
    /// Package-relative path.
    pub rel: String,
    /// `None` for a file the plan creates.
    pub before: Option<String>,
    pub after: String,
}

/// Every file change of one `apply`, built and checked in memory before anything is written.
#[derive(Debug, Clone, Default)]
pub struct ChangeSet {
    pub changes: Vec<FileChange>,
}

impl ChangeSet {
    /// Combine the edits of the patches into per-file changes.
    pub fn build(planned: Vec<PatchEdit>, src: &mut Sources) -> Result<ChangeSet> {
        let mut edits: BTreeMap<String, Vec<Edit>> = BTreeMap::new();
        let mut creates: BTreeMap<String, String> = BTreeMap::new();
        for p in planned {
            match p {
                PatchEdit::Edits { rel, edits: e } => edits.entry(rel).or_default().extend(e),
                PatchEdit::Create { rel, text } => {
                    if creates.insert(rel.clone(), text).is_some() {
                        anyhow::bail!("two patches create {rel}");
                    }
                }
            }
        }
        let mut changes = Vec::new();
        for (rel, e) in edits {
            anyhow::ensure!(
                !creates.contains_key(&rel),
                "{rel} is both created and edited by the selected patches"
            );
            let before = src
                .text(&rel)?
                .ok_or_else(|| anyhow!("{rel} vanished while planning"))?
                .to_string();
            let after = apply_edits(&before, &e).map_err(|err| anyhow!("{rel}: {err}"))?;
            changes.push(FileChange {
                rel,
                before: Some(before),
                after,
            });
        }
        for (rel, text) in creates {
            if src.text(&rel)?.is_some() {
                return Err(Refusal::drift(format!(
                    "{rel}: would be created, but a file is already there"
                ))
                .into());
            }
            changes.push(FileChange {
                rel,
                before: None,
                after: text,
            });
        }
        changes.sort_by(|a, b| a.rel.cmp(&b.rel));
        Ok(ChangeSet { changes })
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Every new text parses with tree-sitter and compiles with CPython.
    pub fn validate(&self, python: &Python) -> Result<()> {
        let mut problems = Vec::new();
        for c in &self.changes {
            let parsed = PyFile::parse(&c.rel, c.after.clone())?;
            if let Some(e) = parsed.syntax_error() {
                problems.push(format!(
                    "{}: patched file does not parse (tree-sitter): {e}",
                    c.rel
                ));
            }
        }
        let texts: Vec<(String, &str)> = self
            .changes
            .iter()
            .map(|c| (c.rel.clone(), c.after.as_str()))
            .collect();
        for (rel, msg) in python.compile_failures(&texts)? {
            let before = self
                .changes
                .iter()
                .find(|c| c.rel == rel)
                .and_then(|c| c.before.as_deref());
            // Say whether the file was already broken, which is a different fix for the user.
            let pre = match before {
                Some(b) if !python.compile_failures(&[(rel.clone(), b)])?.is_empty() => {
                    " (the unpatched file does not compile either)"
                }
                _ => "",
            };
            problems.push(format!(
                "{rel}: patched file does not compile with {}: {msg}{pre}",
                python.exe.display()
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Refusal::error(
                "refusing to write: a patched file would be invalid; nothing was changed",
                problems,
            )
            .into())
        }
    }

    /// Unified diff of the whole change set, paths relative to the `--sglang-root`.
    pub fn diff(&self, tree: &SglangTree) -> String {
        self.changes
            .iter()
            .map(|c| {
                diff::unified(
                    &format!("{}{}", tree.prefix, c.rel),
                    c.before.as_deref(),
                    Some(&c.after),
                )
            })
            .collect()
    }

    /// What committing this change set records (after [`ChangeSet::validate`]): `groups`
    /// added to the manifest, and for each file the first original and the new hash.
    pub fn record(&self, tree: &SglangTree, groups: &[&str]) -> Result<Record> {
        let mut manifest = Manifest::load(tree)?.unwrap_or_else(|| Manifest::new(tree));
        let mut originals = Vec::new();
        for g in groups {
            if !manifest.groups.iter().any(|x| x == g) {
                manifest.groups.push(g.to_string());
            }
        }
        for c in &self.changes {
            let post = sha256(c.after.as_bytes());
            let before_sha = c.before.as_ref().map(|b| sha256(b.as_bytes()));
            match manifest.files.get_mut(&c.rel) {
                // Patched before by another group and untouched since: keep the first original,
                // move the post hash.
                Some(rec)
                    if before_sha.as_deref() == Some(rec.post_sha256.as_str())
                        || (rec.created && c.before.is_none()) =>
                {
                    rec.post_sha256 = post
                }
                // No record, or a stale one (the file was restored or replaced, e.g. by an SGLang
                // upgrade, since the last apply): what is there now is the original to keep.
                _ => {
                    if let Some(before) = &c.before {
                        originals.push((c.rel.clone(), before.as_bytes().to_vec()));
                    } else {
                        let mut dir = tree.path(&c.rel).parent().map(|p| p.to_path_buf());
                        let mut new_dirs = Vec::new();
                        while let Some(d) = dir.filter(|d| !d.exists()) {
                            new_dirs.push(
                                d.strip_prefix(&tree.parent)
                                    .expect("below parent")
                                    .to_string_lossy()
                                    .to_string(),
                            );
                            dir = d.parent().map(|p| p.to_path_buf());
                        }
                        new_dirs.reverse();
                        for d in new_dirs {
                            if !manifest.created_dirs.contains(&d) {
                                manifest.created_dirs.push(d);
                            }
                        }
                    }
                    manifest.files.insert(
                        c.rel.clone(),
                        FileRecord {
                            created: c.before.is_none(),
                            pre_sha256: before_sha,
                            post_sha256: post,
                        },
                    );
                }
            }
        }
        Ok(Record::Save {
            manifest,
            originals,
        })
    }

    /// Record and write this change set (after [`ChangeSet::validate`]) through [`commit`].
    pub fn commit(&self, tree: &SglangTree, groups: &[&str]) -> Result<()> {
        commit(tree, self.record(tree, groups)?, &self.writes())?;
        Ok(())
    }

    /// The file writes of this change set.
    pub fn writes(&self) -> Vec<FileWrite> {
        self.changes
            .iter()
            .map(|c| FileWrite::Put {
                rel: c.rel.clone(),
                bytes: c.after.as_bytes().to_vec(),
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Commit: the one write path of `apply` and `revert`
// ---------------------------------------------------------------------------------------------

/// One file the commit step writes (package-relative).
#[derive(Debug, Clone)]
pub enum FileWrite {
    /// Create or replace the file with these bytes.
    Put { rel: String, bytes: Vec<u8> },
    /// Delete the file.
    Remove { rel: String },
}

/// What a commit does with the manifest folder (`sglang/.kvtuner-patch/`).
#[derive(Debug, Clone)]
pub enum Record {
    /// `apply`: before any file is written, save these pre-apply originals (package-relative
    /// path, bytes), then this manifest; a crash after that leaves a tree `revert` can restore.
    Save {
        manifest: Manifest,
        originals: Vec<(String, Vec<u8>)>,
    },
    /// `revert`: after every file is written, remove these folders apply created when they
    /// are empty (listed outermost first; anything put there since is the user's and stays),
    /// then the manifest folder if there is one.
    Clear { created_dirs: Vec<String> },
}

/// Write `writes` in order, each through a temporary file and a rename, with the manifest
/// step `record` before (apply) or after (revert) them. If a write fails, the files already
/// written get their previous bytes back (best effort) and the previous manifest is restored.
/// Returns the folders removed (`Record::Clear`), each with a trailing `/`.
pub fn commit(tree: &SglangTree, record: Record, writes: &[FileWrite]) -> Result<Vec<String>> {
    let previous_manifest = Manifest::load(tree)?;
    if let Record::Save {
        manifest,
        originals,
    } = &record
    {
        for (rel, bytes) in originals {
            write_atomic(
                &Manifest::original_path(tree, rel),
                bytes,
                Some(&tree.path(rel)),
            )?;
        }
        manifest.save(tree)?;
    }
    let mut done: Vec<(&str, Option<Vec<u8>>)> = Vec::new();
    for w in writes {
        let (rel, result) = match w {
            FileWrite::Put { rel, bytes } => (rel, write_change(tree, rel, Some(bytes))),
            FileWrite::Remove { rel } => (rel, write_change(tree, rel, None)),
        };
        match result {
            Ok(before) => done.push((rel, before)),
            Err(e) => {
                rollback(tree, &done, &record, previous_manifest.as_ref());
                return Err(e).with_context(|| format!("writing {rel} (changes rolled back)"));
            }
        }
    }
    let mut removed = Vec::new();
    if let Record::Clear { created_dirs } = &record {
        for d in created_dirs.iter().rev() {
            // Only if empty: anything else put there is the user's.
            if fs::remove_dir(tree.path(d)).is_ok() {
                removed.push(format!("{d}/"));
            }
        }
        match fs::remove_dir_all(Manifest::dir(tree)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    Ok(removed)
}

/// Put `bytes` at `rel` (or delete it for `None`); returns what was there before.
fn write_change(tree: &SglangTree, rel: &str, bytes: Option<&[u8]>) -> Result<Option<Vec<u8>>> {
    let path = tree.path(rel);
    let before = read_if_exists(&path)?;
    match bytes {
        Some(b) => write_atomic(&path, b, None)?,
        None => fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?,
    }
    Ok(before)
}

fn rollback(
    tree: &SglangTree,
    done: &[(&str, Option<Vec<u8>>)],
    record: &Record,
    previous: Option<&Manifest>,
) {
    for (rel, before) in done {
        let path = tree.path(rel);
        let _ = match before {
            Some(b) => write_atomic(&path, b, None),
            None => fs::remove_file(&path).map_err(Into::into),
        };
    }
    if let Record::Save { .. } = record {
        let _ = match previous {
            Some(m) => m.save(tree),
            None => fs::remove_dir_all(Manifest::dir(tree)).map_err(Into::into),
        };
    }
}
