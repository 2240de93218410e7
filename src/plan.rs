//! All-or-nothing changes: build every new file text in memory, check each one, then write.
//!
//! 1. Edits of all patches (of all groups) are grouped per file and applied to the original
//!    text in one go (`edit::apply_edits`; overlap is an error).
//! 2. Every result is re-parsed with tree-sitter (no ERROR/MISSING node) *and* compiled by
//!    CPython (tree-sitter accepts inconsistent indentation; the interpreter does not).
//! 3. Only then is anything written: originals and manifest first, then each file through a
//!    temporary file and a rename in its own folder. If a rename fails, files already
//!    replaced are put back (best effort) and the previous manifest restored.

use crate::anchor::Planned;
use crate::diff;
use crate::edit::{apply_edits, Edit};
use crate::manifest::{write_atomic, FileRecord, Manifest};
use crate::marker::sha256;
use crate::python::Python;
use crate::refusal::Refusal;
use crate::sources::Sources;
use crate::syntax::PyFile;
use crate::tree::SglangTree;
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

#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub changes: Vec<FileChange>,
}

impl Plan {
    /// Combine the planned patches into per-file changes.
    pub fn build(planned: Vec<Planned>, src: &mut Sources) -> Result<Plan> {
        let mut edits: BTreeMap<String, Vec<Edit>> = BTreeMap::new();
        let mut creates: BTreeMap<String, String> = BTreeMap::new();
        for p in planned {
            match p {
                Planned::Edits { rel, edits: e } => edits.entry(rel).or_default().extend(e),
                Planned::Create { rel, text } => {
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
        Ok(Plan { changes })
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

    /// Unified diff of the whole plan, paths relative to the `--sglang-root`.
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

    /// Write the plan (after [`Plan::validate`]) and record it in the manifest.
    pub fn commit(&self, tree: &SglangTree, groups: &[&str]) -> Result<()> {
        let previous = Manifest::load(tree)?;
        let mut manifest = previous.clone().unwrap_or_else(|| Manifest::new(tree));
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
                        write_atomic(
                            &Manifest::original_path(tree, &c.rel),
                            before.as_bytes(),
                            Some(&tree.path(&c.rel)),
                        )?;
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
                            pre_sha256: c.before.as_ref().map(|b| sha256(b.as_bytes())),
                            post_sha256: post,
                        },
                    );
                }
            }
        }
        manifest.save(tree)?;
        let mut done: Vec<&FileChange> = Vec::new();
        for c in &self.changes {
            if let Err(e) = write_atomic(&tree.path(&c.rel), c.after.as_bytes(), None) {
                rollback(tree, &done, previous.as_ref());
                return Err(e).with_context(|| format!("writing {} (changes rolled back)", c.rel));
            }
            done.push(c);
        }
        Ok(())
    }
}

fn rollback(tree: &SglangTree, done: &[&FileChange], previous: Option<&Manifest>) {
    for c in done {
        let path = tree.path(&c.rel);
        let _ = match &c.before {
            Some(b) => write_atomic(&path, b.as_bytes(), None),
            None => fs::remove_file(&path).map_err(Into::into),
        };
    }
    let _ = match previous {
        Some(m) => m.save(tree),
        None => fs::remove_dir_all(Manifest::dir(tree)).map_err(Into::into),
    };
}
