//! Rendering a [`Snippet`] into the lines a patch inserts: literal text, the body of a class in
//! a file under `patches/`, or flag declarations in an era's syntax; dedented, with the names
//! its statements bind (the code signal of a class-body patch).

use crate::engine::declarations;
use crate::engine::syntax::{self, PyFile};
use crate::patch::{DeclarationForm, Snippet};
use anyhow::{anyhow, bail, Result};

/// Unindented lines of a snippet (each ending in `\n`) and the names its statements bind.
pub fn snippet_lines(s: Snippet) -> Result<(String, Vec<String>)> {
    match s {
        Snippet::Text(t) => text_lines(t),
        Snippet::ClassBodyOf {
            source,
            source_path,
            class,
        } => class_body_lines(source, source_path, class),
        Snippet::Declarations {
            source,
            source_path,
            class,
            form,
        } => match form {
            DeclarationForm::Namespaced(marker) => {
                let text = declarations::with_namespace(source, source_path, class, marker)?;
                class_body_lines(&text, &format!("{source_path} (+ {marker})"), class)
            }
            DeclarationForm::DataclassFields { heading } => {
                let flags = declarations::read(source, source_path, class)?;
                text_lines(&declarations::dataclass_fields(&flags, heading)?)
            }
            DeclarationForm::AddArguments { heading } => {
                let flags = declarations::read(source, source_path, class)?;
                text_lines(&declarations::add_arguments(&flags, heading)?)
            }
        },
    }
}

/// Literal lines, dedented, and the names they bind (`name: T = v` fields: the code signal).
fn text_lines(t: &str) -> Result<(String, Vec<String>)> {
    let text = dedent(t.trim_matches('\n'));
    let pf = PyFile::parse("<snippet>", text.clone())?;
    let names = match pf.syntax_error() {
        Some(_) => Vec::new(),
        None => syntax::module_statements(&pf)
            .into_iter()
            .filter_map(|n| syntax::statement_binds(&pf, n))
            .collect(),
    };
    Ok((text, names))
}

/// The body (docstring excluded) of `class` in `source`, dedented, and the names it binds.
fn class_body_lines(source: &str, source_path: &str, class: &str) -> Result<(String, Vec<String>)> {
    let pf = PyFile::parse(source_path, source.to_string())?;
    if let Some(e) = pf.syntax_error() {
        bail!("embedded patch {source_path} does not parse: {e}");
    }
    let cls = syntax::classes(&pf, class);
    let [cls] = cls[..] else {
        bail!("embedded patch {source_path}: expected one class `{class}`")
    };
    let mut stmts = syntax::body_statements(cls);
    let start = match stmts.first() {
        Some(first) if syntax::is_docstring(*first) => {
            let end = syntax::line_end(&pf.src, first.end_byte());
            stmts.remove(0);
            end
        }
        Some(first) => syntax::line_start(&pf.src, first.start_byte()),
        None => bail!("embedded patch {source_path}: class `{class}` is empty"),
    };
    let last = stmts
        .last()
        .ok_or_else(|| anyhow!("embedded patch {source_path}: `{class}` has only a docstring"))?;
    let end = syntax::line_end(&pf.src, last.end_byte());
    let names = stmts
        .iter()
        .filter_map(|n| syntax::statement_binds(&pf, *n))
        .collect();
    Ok((dedent(pf.src[start..end].trim_start_matches('\n')), names))
}

/// Remove the common leading whitespace; blank lines become empty; ends with `\n`.
fn dedent(text: &str) -> String {
    let common = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let mut out = String::new();
    for l in text.lines() {
        if !l.trim().is_empty() {
            out.push_str(&l[common..]);
        }
        out.push('\n');
    }
    out
}

/// Prefix every non-blank line with `indent`.
pub fn indent_lines(text: &str, indent: &str) -> String {
    text.split_inclusive('\n')
        .map(|l| {
            if l.trim().is_empty() {
                l.to_string()
            } else {
                format!("{indent}{l}")
            }
        })
        .collect()
}
