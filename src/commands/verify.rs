//! `verify`: every selected group applied and intact, every touched file parses
//! (tree-sitter) and compiles (CPython), and optionally `import kvtuner_quant` works.

use super::{group_status, require_supported, selection, GroupState, GroupStatus, Report, Text};
use crate::engine::manifest::Manifest;
use crate::engine::python::Python;
use crate::engine::sources::Sources;
use crate::engine::syntax::PyFile;
use crate::fsio;
use crate::patch::PatchKind;
use crate::refusal::{EXIT_DRIFT, EXIT_OK};
use crate::sglang_tree::SglangTree;
use anyhow::Result;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct FileCheck {
    pub file: String,
    pub parses: bool,
    pub compiles: bool,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ImportCheck {
    pub python: String,
    pub module: String,
    pub ok: bool,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub groups: Vec<GroupStatus>,
    pub files: Vec<FileCheck>,
    pub kvtuner_quant: Option<ImportCheck>,
    pub problems: Vec<String>,
    /// Things that are fine now but worth knowing (e.g. `revert` will need `--force`).
    pub notes: Vec<String>,
}

impl Report for VerifyReport {
    fn exit_code(&self) -> i32 {
        if self.ok {
            EXIT_OK
        } else {
            EXIT_DRIFT
        }
    }

    fn render(&self, text: &mut Text) {
        text.groups(&self.groups);
        for f in &self.files {
            let ok = f.parses && f.compiles;
            text.line(format!("  {} {}", if ok { "ok " } else { "BAD" }, f.file));
        }
        if let Some(k) = &self.kvtuner_quant {
            text.line(format!(
                "  {} import kvtuner_quant with {}",
                if k.ok { "ok " } else { "BAD" },
                k.python
            ));
        }
        for p in &self.problems {
            text.line(format!("problem: {p}"));
        }
        for n in &self.notes {
            text.line(format!("note: {n}"));
        }
        text.line(if self.ok { "verified" } else { "verify FAILED" });
    }
}

pub fn verify(
    root: &Path,
    only: &[String],
    python: &Python,
    check_import: bool,
) -> Result<VerifyReport> {
    let tree = SglangTree::resolve(root)?;
    let sel = selection(&tree, only)?;
    require_supported(&tree, &sel)?;
    let selected = sel.groups;
    let mut src = Sources::new(&tree);
    let mut statuses = Vec::new();
    let mut problems = Vec::new();
    if let Some(i) = crate::journal::interrupted(&tree.parent) {
        problems.push(i.describe());
    }
    let mut touched: Vec<String> = Vec::new();
    for g in &selected {
        let st = group_status(&mut src, g)?;
        match st.state {
            GroupState::Applied => {}
            GroupState::NotApplied => problems.push(format!("group `{}` is not applied", g.id)),
            GroupState::Drifted => problems.extend(st.problems()),
        }
        for p in &st.patches {
            if let Some(f) = &p.file {
                if !touched.contains(f) {
                    touched.push(f.clone());
                }
            }
        }
        for p in &g.patches {
            if let PatchKind::InjectFile { dest, .. } = p.kind {
                if src.text(dest)?.is_none() {
                    problems.push(format!("{}: injected file {dest} is missing", g.tag(p)));
                }
            }
        }
        statuses.push(st);
    }
    // Every touched file: tree-sitter parse, then one CPython compile for all of them.
    let mut files = Vec::new();
    let mut texts: Vec<(String, String)> = Vec::new();
    for rel in &touched {
        let Some(text) = src.text(rel)? else { continue };
        let text = text.to_string();
        let err = PyFile::parse(rel.as_str(), text.clone())?.syntax_error();
        if let Some(e) = &err {
            problems.push(format!("{rel}: does not parse (tree-sitter): {e}"));
        }
        files.push(FileCheck {
            file: rel.clone(),
            parses: err.is_none(),
            compiles: true,
            error: err,
        });
        texts.push((rel.clone(), text));
    }
    let refs: Vec<(String, &str)> = texts.iter().map(|(r, t)| (r.clone(), t.as_str())).collect();
    for (rel, msg) in python.compile_failures(&refs)? {
        problems.push(format!("{rel}: does not compile: {msg}"));
        if let Some(f) = files.iter_mut().find(|f| f.file == rel) {
            f.compiles = false;
            f.error.get_or_insert(msg);
        }
    }
    let kvtuner_quant = if check_import {
        let r = python.check_import("kvtuner_quant")?;
        if let Err(e) = &r {
            problems.push(format!(
                "{} cannot import kvtuner_quant: {e}",
                python.exe.display()
            ));
        }
        Some(ImportCheck {
            python: python.exe.display().to_string(),
            module: "kvtuner_quant".into(),
            ok: r.is_ok(),
            error: r.err(),
        })
    } else {
        None
    };
    let mut notes = Vec::new();
    if let Some(m) = Manifest::load(&tree)? {
        for (rel, rec) in &m.files {
            let now = fsio::sha256_of_file(&tree.path(rel)).ok().flatten();
            if now.as_deref() != Some(rec.post_sha256.as_str()) {
                notes.push(format!(
                    "{rel} changed since apply; `revert` will refuse it without --force"
                ));
            }
        }
    }
    Ok(VerifyReport {
        ok: problems.is_empty(),
        groups: statuses,
        files,
        kvtuner_quant,
        problems,
        notes,
    })
}
