//! `revert`: back to the exact pre-apply bytes from the manifest (refusing, naming the file,
//! where a patched file was edited since apply, unless `--force`), through the same commit
//! step as `apply`. Without a manifest, `--force` strips the marked blocks instead.

use super::{group_status, lock_and_recover, selection, GroupState, Report, Text};
use crate::engine::changeset::{self, FileWrite, Record};
use crate::engine::manifest::Manifest;
use crate::engine::marker;
use crate::engine::sources::Sources;
use crate::fsio;
use crate::patch::PatchKind;
use crate::refusal::{Refusal, EXIT_OK};
use crate::sglang_tree::SglangTree;
use anyhow::Result;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize, Default)]
pub struct RevertReport {
    /// Files given back their pre-apply bytes.
    pub restored: Vec<String>,
    /// Injected files (and folders) removed.
    pub removed: Vec<String>,
    /// Files edited since apply that `--force` overwrote anyway.
    pub forced: Vec<String>,
    /// Nothing was applied: nothing to do.
    pub nothing_to_do: bool,
    /// Reverted by stripping markers (no manifest; `--force`), not byte-exact by construction.
    pub from_markers: bool,
    /// An interrupted operation this run rolled back before its own work.
    pub recovered: Option<String>,
}

impl Report for RevertReport {
    fn exit_code(&self) -> i32 {
        EXIT_OK
    }

    fn render(&self, text: &mut Text) {
        if self.nothing_to_do {
            text.line("nothing to revert");
            return;
        }
        for f in &self.restored {
            text.line(format!("restored {f}"));
        }
        for f in &self.removed {
            text.line(format!("removed  {f}"));
        }
        for f in &self.forced {
            text.line(format!("forced   {f} (had been edited since apply)"));
        }
    }

    fn recovered(&self) -> Option<&str> {
        self.recovered.as_deref()
    }
}

pub fn revert(root: &Path, force: bool) -> Result<RevertReport> {
    let tree = SglangTree::resolve(root)?;
    let (_lock, recovered) = lock_and_recover(&tree)?;
    let recovered = recovered.map(|i| i.describe());
    let Some(manifest) = Manifest::load(&tree)? else {
        let mut report = revert_without_manifest(&tree, force)?;
        report.recovered = recovered;
        return Ok(report);
    };
    manifest.check_release(&tree)?;
    let mut report = RevertReport {
        recovered,
        ..Default::default()
    };
    let mut writes = Vec::new();
    let mut edited = Vec::new();
    for (rel, rec) in &manifest.files {
        let now = fsio::sha256_of_file(&tree.path(rel))?;
        let untouched = now.as_deref() == Some(rec.post_sha256.as_str());
        if rec.created {
            if now.is_none() {
                continue;
            }
            if !untouched {
                edited.push(rel.clone());
            }
            writes.push(FileWrite::Remove { rel: rel.clone() });
        } else {
            if now.is_some() && now == rec.pre_sha256 {
                continue; // already the original (e.g. apply was interrupted before writing it)
            }
            if !untouched {
                edited.push(rel.clone());
            }
            writes.push(FileWrite::Put {
                rel: rel.clone(),
                bytes: manifest.original(&tree, rel)?,
            });
        }
    }
    if !edited.is_empty() && !force {
        return Err(Refusal::drifts(
            "refusing to revert: patched files were edited after apply (use --force to restore the originals anyway); nothing was changed",
            edited.iter().map(|f| format!("{f}: content differs from what apply wrote")).collect(),
        )
        .into());
    }
    report.forced = edited;
    let record = Record::Clear {
        created_dirs: manifest.created_dirs.clone(),
        manifest: true,
    };
    let removed_dirs = changeset::commit(&tree, record, &writes)?;
    report.record(&writes, removed_dirs);
    Ok(report)
}

/// No manifest: without `--force` refuse if anything of ours is there; with it, strip our
/// marked blocks and injected files (edits outside markers, like an added comma, stay).
fn revert_without_manifest(tree: &SglangTree, force: bool) -> Result<RevertReport> {
    let mut src = Sources::new(tree);
    let mut files: Vec<String> = Vec::new();
    let mut injected: Vec<String> = Vec::new();
    for g in selection(tree, &[])?.groups {
        let st = group_status(&mut src, &g)?;
        if st.state == GroupState::NotApplied {
            continue;
        }
        for (p, ps) in g.patches.iter().zip(&st.patches) {
            match (p.kind, &ps.file) {
                (PatchKind::InjectFile { dest, .. }, _)
                    if src
                        .text(dest)?
                        .is_some_and(|t| marker::check_file_header(&g.tag(p), t).is_some()) =>
                {
                    injected.push(dest.to_string());
                }
                (PatchKind::InjectFile { .. }, _) => {}
                (_, Some(f)) if !files.contains(f) => files.push(f.clone()),
                _ => {}
            }
        }
    }
    if files.is_empty() && injected.is_empty() {
        return Ok(RevertReport {
            nothing_to_do: true,
            ..Default::default()
        });
    }
    if !force {
        return Err(Refusal::drifts(
            "refusing to revert: no manifest (sglang/.kvtuner-patch/manifest.json) in this tree, so a byte-exact revert is impossible; --force strips the marked blocks instead",
            files.iter().chain(&injected).map(|f| format!("{f}: carries kvtuner-patch changes")).collect(),
        )
        .into());
    }
    let mut report = RevertReport {
        from_markers: true,
        ..Default::default()
    };
    let mut writes = Vec::new();
    for rel in &files {
        let text = src.text(rel)?.expect("detected").to_string();
        let blocks = marker::find_blocks(&text).map_err(|e| anyhow::anyhow!("{rel}: {e}"))?;
        let mut out = String::new();
        let mut pos = 0;
        for b in blocks {
            out.push_str(&text[pos..b.range.start]);
            pos = b.range.end;
        }
        out.push_str(&text[pos..]);
        writes.push(FileWrite::Put {
            rel: rel.clone(),
            bytes: src.encoding(rel)?.encode(&out),
        });
    }
    // The folders apply created for injected files, when nothing else is left in them
    // (without a manifest this is the best guess; anything put there is the user's and stays).
    let mut created_dirs: Vec<String> = Vec::new();
    for rel in injected {
        if let Some((dir, _)) = rel.rsplit_once('/') {
            if !created_dirs.iter().any(|d| d == dir) {
                created_dirs.push(dir.to_string());
            }
        }
        writes.push(FileWrite::Remove { rel });
    }
    // Parents before children (the commit removes them in reverse: subfolders first).
    created_dirs.sort();
    let record = Record::Clear {
        created_dirs,
        manifest: false,
    };
    let removed_dirs = changeset::commit(tree, record, &writes)?;
    report.record(&writes, removed_dirs);
    Ok(report)
}

impl RevertReport {
    /// What the commit did, for the report: files restored, then files and folders removed.
    fn record(&mut self, writes: &[FileWrite], removed_dirs: Vec<String>) {
        for w in writes {
            match w {
                FileWrite::Put { rel, .. } => self.restored.push(rel.clone()),
                FileWrite::Remove { rel } => self.removed.push(rel.clone()),
            }
        }
        self.removed.extend(removed_dirs);
    }
}
