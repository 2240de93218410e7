//! All-or-nothing changes: build every new file text in memory, check each one, then write.
//!
//! 1. Edits of all patches (of all groups) are grouped per file and applied to the original
//!    text in one go (`edit::apply_edits`; overlap is an error): a [`ChangeSet`].
//! 2. Every result is re-parsed with tree-sitter (no ERROR/MISSING node) *and* compiled by
//!    CPython (tree-sitter accepts inconsistent indentation; the interpreter does not).
//! 3. Only then is anything written, by [`commit`], the one write path `apply` and `revert`
//!    share: a list of [`FileWrite`]s and what happens to the manifest ([`Record`]), made one
//!    [`journal::Transaction`] (all or nothing, also across a crash).

use crate::engine::diff;
use crate::engine::edit::{apply_edits, Edit, PatchEdit};
use crate::engine::manifest::{FileRecord, Manifest};
use crate::engine::python::Python;
use crate::engine::sources::Sources;
use crate::engine::sources::STATE_DIR;
use crate::engine::syntax::PyFile;
use crate::fsio::sha256;
use crate::journal::{self, Change, Transaction};
use crate::refusal::Refusal;
use crate::sglang_tree::SglangTree;
use crate::source_file::Encoding;
use anyhow::{anyhow, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use walkdir::WalkDir;

/// One file's new content.
#[derive(Debug, Clone)]
pub struct FileChange {
    /// Package-relative path.
    pub rel: String,
    /// `None` for a file the change set creates.
    pub before: Option<String>,
    pub after: String,
    /// The file's BOM and line ends, kept in what is written.
    pub encoding: Encoding,
}

impl FileChange {
    /// The bytes on disk before (exactly: decoding and encoding round-trip).
    pub fn before_bytes(&self) -> Option<Vec<u8>> {
        self.before.as_deref().map(|t| self.encoding.encode(t))
    }

    /// The bytes to write.
    pub fn after_bytes(&self) -> Vec<u8> {
        self.encoding.encode(&self.after)
    }
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
            let encoding = src.encoding(&rel)?;
            changes.push(FileChange {
                rel,
                before: Some(before),
                after,
                encoding,
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
                encoding: Encoding::default(),
            });
        }
        changes.sort_by(|a, b| a.rel.cmp(&b.rel));
        Ok(ChangeSet { changes })
    }

    /// The files this change set writes.
    pub fn files(&self) -> BTreeSet<String> {
        self.changes.iter().map(|c| c.rel.clone()).collect()
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
    /// Entries of an earlier manifest for files outside `known` (every file a group of this
    /// era writes) are dropped, never carried forward.
    pub fn record(
        &self,
        tree: &SglangTree,
        groups: &[&str],
        known: &BTreeSet<String>,
    ) -> Result<Record> {
        let mut manifest = Manifest::load(tree)?.unwrap_or_else(|| Manifest::new(tree));
        manifest.files.retain(|rel, _| known.contains(rel));
        manifest
            .created_dirs
            .retain(|d| known.iter().any(|f| f.starts_with(&format!("{d}/"))));
        let mut originals = Vec::new();
        for g in groups {
            if !manifest.groups.iter().any(|x| x == g) {
                manifest.groups.push(g.to_string());
            }
        }
        for c in &self.changes {
            let post = sha256(&c.after_bytes());
            let before_sha = c.before_bytes().map(|b| sha256(&b));
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
                    if let Some(before) = c.before_bytes() {
                        originals.push((c.rel.clone(), before));
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
    pub fn commit(
        &self,
        tree: &SglangTree,
        groups: &[&str],
        known: &BTreeSet<String>,
    ) -> Result<()> {
        commit(tree, self.record(tree, groups, known)?, &self.writes())?;
        Ok(())
    }

    /// The file writes of this change set.
    pub fn writes(&self) -> Vec<FileWrite> {
        self.changes
            .iter()
            .map(|c| FileWrite::Put {
                rel: c.rel.clone(),
                bytes: c.after_bytes(),
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
    /// then, with `manifest`, the manifest folder.
    Clear {
        created_dirs: Vec<String>,
        manifest: bool,
    },
}

/// Make `writes` and the manifest step `record` one [`journal::Transaction`] and commit it:
/// every change or none, even across a crash (the journal rolls an interrupted one back).
/// `apply` adds its originals and manifest; `revert` removes the manifest folder and, when they
/// are empty then, the folders apply created. Returns the folders removed, each with a `/`.
pub fn commit(tree: &SglangTree, record: Record, writes: &[FileWrite]) -> Result<Vec<String>> {
    let mut changes: Vec<Change> = Vec::new();
    let mut txn = Transaction::default();
    let mut created_by_apply: Vec<String> = Vec::new();
    match &record {
        Record::Save {
            manifest,
            originals,
        } => {
            txn.operation = "apply".into();
            for (rel, bytes) in originals {
                changes.push(Change::Write {
                    rel: format!("{STATE_DIR}/originals/{rel}"),
                    bytes: bytes.clone(),
                    mode: Some(0o644),
                });
            }
            changes.push(Change::Write {
                rel: format!("{STATE_DIR}/manifest.json"),
                bytes: manifest.to_bytes()?,
                mode: Some(0o644),
            });
        }
        Record::Clear { created_dirs, .. } => {
            txn.operation = "revert".into();
            created_by_apply = created_dirs.clone();
        }
    }
    changes.extend(writes.iter().map(|w| match w {
        FileWrite::Put { rel, bytes } => Change::Write {
            rel: rel.clone(),
            bytes: bytes.clone(),
            mode: Some(0o644),
        },
        FileWrite::Remove { rel } => Change::Remove { rel: rel.clone() },
    }));
    if let Record::Clear { manifest: true, .. } = record {
        // The whole manifest folder goes: every file in it, then its folders, deepest first.
        let state = tree.path(STATE_DIR);
        let mut dirs = Vec::new();
        if state.is_dir() {
            for e in WalkDir::new(&state).contents_first(true) {
                let e = e.with_context(|| format!("walking {}", state.display()))?;
                let rel = e
                    .path()
                    .strip_prefix(&tree.parent)
                    .expect("below the package parent")
                    .to_string_lossy()
                    .to_string();
                if e.file_type().is_dir() {
                    dirs.push(rel);
                } else {
                    changes.push(Change::Remove { rel });
                }
            }
        }
        txn.remove_dirs = dirs;
    }
    txn.remove_dirs
        .extend(created_by_apply.iter().rev().cloned());
    // Every missing folder on the way to a written file, parents first.
    for c in &changes {
        if let Change::Write { rel, .. } = c {
            let mut parents: Vec<&str> = Vec::new();
            let mut cur = rel.as_str();
            while let Some((dir, _)) = cur.rsplit_once('/') {
                if tree.path(dir).exists() {
                    break;
                }
                parents.push(dir);
                cur = dir;
            }
            for d in parents.into_iter().rev() {
                if !txn.create_dirs.iter().any(|x| x == d) {
                    txn.create_dirs.push(d.to_string());
                }
            }
        }
    }
    txn.changes = changes;
    let removed = journal::commit(&tree.parent, &txn)?;
    Ok(created_by_apply
        .iter()
        .filter(|d| removed.contains(d))
        .map(|d| format!("{d}/"))
        .collect())
}
