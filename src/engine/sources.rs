//! Read-once cache of the tree's Python files, parsed on first use.
//!
//! Planning and detection read the same files many times; each is read and parsed once per
//! command. Paths are package-relative (`sglang/srt/...`). Files are read through
//! [`crate::source_file`]: regular files only, size-limited, the BOM and CRLF line ends taken
//! off (and remembered, for writing) so the engine always works on LF text.

use crate::engine::syntax::{self, PyFile};
use crate::sglang_tree::SglangTree;
use crate::source_file::{read_regular, Encoding};
use anyhow::{anyhow, Context, Result};
use std::collections::{BTreeMap, HashMap};
use walkdir::WalkDir;

/// Folder (inside `sglang/`) where the engine keeps its manifest; never scanned for anchors
/// (nor is the journal beside it: every name starting with [`OWN_PREFIX`]).
pub const STATE_DIR: &str = "sglang/.kvtuner-patch";
pub const OWN_PREFIX: &str = ".kvtuner-patch";

pub struct Sources<'a> {
    pub tree: &'a SglangTree,
    files: HashMap<String, Option<PyFile>>,
    texts: HashMap<String, Option<(String, Encoding)>>,
    /// (folder, needle) -> matching files; a walk of `sglang/srt` is the costliest step.
    searches: HashMap<(String, String), Vec<String>>,
    /// `.py` files a search could not read, with why (for drift messages).
    unread: BTreeMap<String, String>,
}

impl<'a> Sources<'a> {
    pub fn new(tree: &'a SglangTree) -> Self {
        Sources {
            tree,
            files: HashMap::new(),
            texts: HashMap::new(),
            searches: HashMap::new(),
            unread: BTreeMap::new(),
        }
    }

    /// Text of a package-relative file (LF line ends, no BOM), `None` if it does not exist.
    /// A symlink, a non-regular or oversized file, or one that is not UTF-8 is an error naming it.
    pub fn text(&mut self, rel: &str) -> Result<Option<&str>> {
        if !self.texts.contains_key(rel) {
            let text = match read_regular(&self.tree.path(rel)).map_err(|p| anyhow!("{rel} {p}"))? {
                Some(bytes) => {
                    Some(Encoding::decode(&bytes).with_context(|| format!("{rel}: not UTF-8"))?)
                }
                None => None,
            };
            self.texts.insert(rel.to_string(), text);
        }
        Ok(self.texts[rel].as_ref().map(|(t, _)| t.as_str()))
    }

    /// How `rel`'s bytes map to its text (BOM, CRLF), to write it back the same way.
    pub fn encoding(&mut self, rel: &str) -> Result<Encoding> {
        self.text(rel)?;
        Ok(self.texts[rel]
            .as_ref()
            .map(|(_, e)| *e)
            .unwrap_or_default())
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

    /// Files below `under` that searches could not read, as `rel (why)`.
    pub fn unread_under(&self, under: &str) -> Vec<String> {
        let prefix = format!("{under}/");
        self.unread
            .iter()
            .filter(|(rel, _)| rel.starts_with(&prefix))
            .map(|(rel, why)| format!("{rel} ({why})"))
            .collect()
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
            .filter_entry(|e| !e.file_name().to_string_lossy().starts_with(OWN_PREFIX))
        {
            let entry = entry.with_context(|| format!("walking {}", base.display()))?;
            if entry.file_type().is_dir() || entry.path().extension().is_none_or(|x| x != "py") {
                continue;
            }
            let rel = entry
                .path()
                .strip_prefix(&self.tree.parent)
                .expect("walk stays under the package parent")
                .to_string_lossy()
                .replace('\\', "/");
            // A file that cannot be read as a module (unreadable, oversized, not UTF-8, nested
            // past what CPython accepts) cannot be the one an anchor looks for: it is skipped,
            // so a stray odd file elsewhere never stops a command.
            let bytes = match read_regular(entry.path()) {
                Ok(Some(bytes)) => bytes,
                Ok(None) => continue,
                Err(why) => {
                    self.unread.insert(rel, format!("{why}"));
                    continue;
                }
            };
            if !memfind(&bytes, needle.as_bytes()) {
                continue;
            }
            match Encoding::decode(&bytes) {
                Ok((text, _)) if syntax::bracket_depth(&text) <= syntax::MAX_NESTING => {
                    hits.push(rel)
                }
                Ok(_) => {
                    self.unread
                        .insert(rel, "brackets nest too deep to be a module".into());
                }
                Err(_) => {
                    self.unread.insert(rel, "not UTF-8".into());
                }
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
