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
//! Crash safety: originals and the manifest are written (atomically) *before* any patched
//! file is renamed into place. If `apply` dies midway, a file still holding its pre-apply
//! hash is simply skipped by `revert`. A later `apply` keeps the earliest original.

use crate::engine::sources::STATE_DIR;
use crate::fsio::{sha256, write_atomic};
use crate::sglang_tree::SglangTree;
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

    pub fn load(tree: &SglangTree) -> Result<Option<Manifest>> {
        let path = Self::path(tree);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let m: Manifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not a kvtuner-patch manifest", path.display()))?;
        anyhow::ensure!(
            m.format == FORMAT,
            "{}: manifest format {} is not {FORMAT}",
            path.display(),
            m.format
        );
        Ok(Some(m))
    }

    pub fn save(&self, tree: &SglangTree) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        write_atomic(&Self::path(tree), &bytes, None)
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
