//! What `apply` changed, kept in the tree so `revert` can restore it byte for byte.
//!
//! Layout (inside the package, so it travels with the tree it describes):
//!
//! ```text
//! sglang/.kvtuner-patch/manifest.json          groups applied; per file: created?, pre/post sha256
//! sglang/.kvtuner-patch/originals/<rel path>   the pre-apply bytes of every modified file
//! ```
//!
//! Why a manifest and not only marker removal: a few edits are not whole marked lines (a
//! comma added after the last item of a list, a newline added at the end of a file), and
//! file modes and exact bytes must come back. The per-file post-apply hash lets `revert`
//! refuse, naming the file, when someone edited a patched file after `apply`.
//!
//! Crash safety: the originals and the manifest are written in the same journaled transaction
//! as the patched files ([`crate::journal`]): all of them or none. A later `apply` keeps the
//! earliest original.

use crate::engine::sources::STATE_DIR;
use crate::fsio::sha256;
use crate::refusal::Refusal;
use crate::safe_path;
use crate::sglang_tree::SglangTree;
use crate::source_file::read_regular;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileRecord {
    /// The file did not exist before `apply` (an injected file).
    pub created: bool,
    pub pre_sha256: Option<String>,
    pub post_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub tool_version: String,
    pub sglang_version: Option<String>,
    pub groups: Vec<String>,
    /// Package-relative path -> record.
    pub files: BTreeMap<String, FileRecord>,
    /// Folders `apply` had to create for injected files, removed again by `revert` (deepest last).
    #[serde(default)]
    pub created_dirs: Vec<String>,
}

impl Manifest {
    pub fn new(tree: &SglangTree) -> Self {
        Manifest {
            format: FORMAT,
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            sglang_version: tree.version.clone(),
            groups: Vec::new(),
            files: BTreeMap::new(),
            created_dirs: Vec::new(),
        }
    }

    pub fn dir(tree: &SglangTree) -> PathBuf {
        tree.path(STATE_DIR)
    }

    pub fn path(tree: &SglangTree) -> PathBuf {
        Self::dir(tree).join("manifest.json")
    }

    pub fn original_path(tree: &SglangTree, rel: &str) -> PathBuf {
        Self::dir(tree).join("originals").join(rel)
    }

    /// The tree's manifest, `None` if there is none. It is read from the tree, so it is
    /// untrusted: every path it names must be a normalised path inside `sglang/` reached
    /// without a symlink, or the whole manifest is refused (exit 2, naming the entry).
    pub fn load(tree: &SglangTree) -> Result<Option<Manifest>> {
        let path = Self::path(tree);
        let bytes =
            read_regular(&path).map_err(|p| anyhow::anyhow!("{STATE_DIR}/manifest.json {p}"))?;
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let m: Manifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not a kvtuner-patch manifest", path.display()))?;
        anyhow::ensure!(
            m.format == FORMAT,
            "{}: manifest format {} is not {FORMAT}",
            path.display(),
            m.format
        );
        let bad: Vec<String> = m
            .files
            .keys()
            .chain(&m.created_dirs)
            .filter_map(|rel| unsafe_entry(tree, rel).map(|why| format!("{rel}: {why}")))
            .collect();
        if !bad.is_empty() {
            return Err(Refusal::error(
                format!(
                    "refusing to use {STATE_DIR}/manifest.json: it names paths this tool never \
                     writes; nothing was changed (remove the folder {STATE_DIR} if the tree is \
                     otherwise as you want it)"
                ),
                bad,
            )
            .into());
        }
        Ok(Some(m))
    }

    /// Refuse a manifest written for another release than the tree now holds (SGLang was
    /// reinstalled over a patched tree): its originals belong to that other release.
    pub fn check_release(&self, tree: &SglangTree) -> Result<()> {
        match (&self.sglang_version, &tree.version) {
            (Some(was), Some(now)) if was != now => Err(Refusal::error(
                format!(
                    "refusing: this tree was patched as SGLang {was}, but it now holds SGLang \
                     {now} (reinstalled over the patched tree); the saved originals are {was}'s \
                     and would break {now}. Nothing was changed. For a clean tree: reinstall \
                     SGLang {now} (`pip install --force-reinstall --no-deps sglang=={now}`), then \
                     remove {STATE_DIR} and sglang/srt/mem_cache/kvtuner_hicache"
                ),
                Vec::new(),
            )
            .into()),
            _ => Ok(()),
        }
    }

    /// The manifest file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        Ok(bytes)
    }

    /// The saved pre-apply bytes of `rel`, checked against the recorded hash.
    pub fn original(&self, tree: &SglangTree, rel: &str) -> Result<Vec<u8>> {
        let path = Self::original_path(tree, rel);
        let bytes = fs::read(&path).with_context(|| {
            format!(
                "the saved original of {rel} is missing ({})",
                path.display()
            )
        })?;
        let want = self.files.get(rel).and_then(|r| r.pre_sha256.as_deref());
        anyhow::ensure!(
            want == Some(sha256(&bytes).as_str()),
            "the saved original of {rel} ({}) does not match the manifest; refusing to restore it",
            path.display()
        );
        Ok(bytes)
    }
}

/// Why a manifest path is not one this tool could have written, if it is not.
fn unsafe_entry(tree: &SglangTree, rel: &str) -> Option<String> {
    if let Err(p) = safe_path::check_normalised(rel) {
        return Some(p.to_string());
    }
    if !rel.starts_with("sglang/") || rel.starts_with(&format!("{STATE_DIR}/")) {
        return Some("is not a path of the SGLang package outside the state folder".into());
    }
    safe_path::inside(&tree.parent, rel)
        .err()
        .map(|p| p.to_string())
}
