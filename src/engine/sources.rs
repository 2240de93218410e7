//! Read-once cache of the tree's Python files, parsed on first use.
//!
//! Planning and detection read the same files many times; each is read and parsed once per
//! command. Paths are package-relative (`sglang/srt/...`).

use crate::engine::syntax::PyFile;
use crate::sglang_tree::SglangTree;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::fs;
use walkdir::WalkDir;

/// Folder (inside `sglang/`) where the engine keeps its manifest; never scanned for anchors.
pub const STATE_DIR: &str = "sglang/.kvtuner-patch";

pub struct Sources<'a> {
    pub tree: &'a SglangTree,
    files: HashMap<String, Option<PyFile>>,
    texts: HashMap<String, Option<String>>,
    /// (folder, needle) -> matching files; a walk of `sglang/srt` is the costliest step.
    searches: HashMap<(String, String), Vec<String>>,
}

impl<'a> Sources<'a> {
    pub fn new(tree: &'a SglangTree) -> Self {
        Sources {
            tree,
            files: HashMap::new(),
            texts: HashMap::new(),
            searches: HashMap::new(),
        }
    }

    /// Raw text of a package-relative file, `None` if it does not exist.
    pub fn text(&mut self, rel: &str) -> Result<Option<&str>> {
        if !self.texts.contains_key(rel) {
            let path = self.tree.path(rel);
            let text = match fs::read(&path) {
                Ok(bytes) => {
                    Some(String::from_utf8(bytes).with_context(|| format!("{rel}: not UTF-8"))?)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            self.texts.insert(rel.to_string(), text);
        }
        Ok(self.texts[rel].as_deref())
    }

    /// Parse (once) and return a file; `None` if it does not exist.
    pub fn load(&mut self, rel: &str) -> Result<Option<&PyFile>> {
        if !self.files.contains_key(rel) {
            let parsed = match self.text(rel)? {
                Some(t) => Some(PyFile::parse(rel, t.to_string())?),
                None => None,
            };
            self.files.insert(rel.to_string(), parsed);
        }
        Ok(self.files[rel].as_ref())
    }

    /// An already loaded file (call [`Sources::load`] first).
    pub fn get(&self, rel: &str) -> Option<&PyFile> {
        self.files.get(rel).and_then(|f| f.as_ref())
    }

    /// `.py` files below `under` whose text contains `needle` (a cheap filter before parsing).
    pub fn files_containing(&mut self, under: &str, needle: &str) -> Result<Vec<String>> {
        let key = (under.to_string(), needle.to_string());
        if let Some(hits) = self.searches.get(&key) {
            return Ok(hits.clone());
        }
        let base = self.tree.path(under);
        let mut hits = Vec::new();
        for entry in WalkDir::new(&base)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|e| e.file_name() != ".kvtuner-patch")
        {
            let entry = entry.with_context(|| format!("walking {}", base.display()))?;
            if !entry.file_type().is_file() || entry.path().extension().is_none_or(|x| x != "py") {
                continue;
            }
            let rel = entry
                .path()
                .strip_prefix(&self.tree.parent)
                .expect("walk stays under the package parent")
                .to_string_lossy()
                .replace('\\', "/");
            // Bytes, not text: a stray non-UTF-8 file elsewhere must not stop the search.
            let bytes = fs::read(entry.path())
                .with_context(|| format!("reading {}", entry.path().display()))?;
            if memfind(&bytes, needle.as_bytes()) {
                hits.push(rel);
            }
        }
        self.searches.insert(key, hits.clone());
        Ok(hits)
    }
}

fn memfind(hay: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() {
        return true;
    }
    let first = needle[0];
    let mut i = 0;
    while let Some(off) = hay[i..].iter().position(|&b| b == first) {
        let start = i + off;
        if hay.len() - start < needle.len() {
            return false;
        }
        if &hay[start..start + needle.len()] == needle {
            return true;
        }
        i = start + 1;
    }
    false
}
