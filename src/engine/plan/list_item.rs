//! [`PatchKind::ListItem`](crate::patch::PatchKind::ListItem): one item, between markers, at
//! the end of a multi-line list literal.

use super::{Code, Planned};
use crate::engine::edit::{Edit, PatchEdit};
use crate::engine::marker;
use crate::engine::resolve::list_node;
use crate::engine::sources::Sources;
use crate::engine::syntax;
use crate::patch::ListRef;
use anyhow::{bail, Result};

pub fn plan(src: &mut Sources, tag: &str, list: ListRef, item: &str) -> Result<Planned> {
    let (rel, start) = list_node(src, tag, list)?;
    let pf = src.get(&rel).expect("loaded");
    let list = syntax::node_at(pf, start, &["list"]);
    if list.start_position().row == list.end_position().row {
        bail!(
            "{tag}: {rel}:{}: list is on one line; only multi-line lists are supported",
            list.start_position().row + 1
        );
    }
    let items = syntax::list_items(list);
    let Some(last) = items.last() else {
        bail!("{tag}: {rel}: list is empty; nothing to take indentation from")
    };
    let code = Code::one(items.iter().any(|n| pf.text(*n) == item));
    let indent = syntax::indent_at(&pf.src, last.start_byte()).to_string();
    let mut edits = Vec::new();
    // A trailing comma is needed before our item unless the list already has one.
    let after_last = pf.src[last.end_byte()..list.end_byte()].trim_start();
    if !after_last.starts_with(',') {
        edits.push(Edit::insert(last.end_byte(), ","));
    }
    let close = list.end_byte() - 1;
    if !pf.src[syntax::line_start(&pf.src, close)..close]
        .trim()
        .is_empty()
    {
        bail!(
            "{tag}: {rel}: the closing `]` of the list shares a line with an item; not supported"
        );
    }
    let text = marker::wrap(&indent, tag, &format!("{indent}{item},\n"));
    edits.push(Edit::insert(syntax::line_start(&pf.src, close), text));
    let edit = PatchEdit::Edits {
        rel: rel.clone(),
        edits,
    };
    Ok(Planned { rel, code, edit })
}
