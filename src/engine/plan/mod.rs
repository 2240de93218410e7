//! Planning a patch on the tree as it is now, one function per [`PatchKind`] (a file each):
//! where its anchor resolves, how much of its code is already there, and the edits that would
//! apply it. Indentation of an inserted block is taken from the anchor it goes next to.

mod after_call;
mod class_body;
mod elif_branch;
mod function_block;
mod inject_file;
mod list_item;

use crate::engine::edit::{Edit, PatchEdit};
use crate::engine::marker;
use crate::engine::snippet::indent_lines;
use crate::engine::sources::Sources;
use crate::engine::state::PatchState;
use crate::patch::{Patch, PatchKind};
use anyhow::Result;

/// A patch planned on the tree as it is now.
pub struct Planned {
    /// Package-relative file the patch lives in.
    pub rel: String,
    pub code: Code,
    pub edit: PatchEdit,
}

/// The code signal of a planned patch: how much of the injected code is in the file (combined
/// with the marker signal by `state::combine`), or, for an injected file, its state outright.
pub enum Code {
    Present { present: usize, total: usize },
    File(PatchState),
}

impl Code {
    /// The signal of a patch that injects one thing: there or not.
    fn one(present: bool) -> Self {
        Code::Present {
            present: present as usize,
            total: 1,
        }
    }
}

/// The file, code signal and edits of `patch` (marker tag `tag`) on the tree as it is now.
pub fn plan(src: &mut Sources, tag: &str, patch: &Patch) -> Result<Planned> {
    match patch.kind {
        PatchKind::InjectFile { dest, source } => inject_file::plan(src, tag, dest, source),
        PatchKind::ClassBody {
            class,
            at,
            block,
            needs,
        } => class_body::plan(src, tag, class, at, block, needs),
        PatchKind::AfterCall {
            file,
            callee,
            first_arg,
            block,
        } => after_call::plan(src, tag, file, callee, first_arg, block),
        PatchKind::ListItem { list, item } => list_item::plan(src, tag, list, item),
        PatchKind::ElifBranch {
            function,
            chain_has,
            condition,
            body,
        } => elif_branch::plan(src, tag, function, chain_has, condition, body),
        PatchKind::FunctionStart { function, block } => {
            function_block::plan(src, tag, function, None, block)
        }
        PatchKind::AfterAssign {
            function,
            target,
            block,
        } => function_block::plan(src, tag, function, Some(target), block),
    }
}

/// Text inserted at `pos`; adds the missing newline when inserting at the end of a file
/// that does not end with one.
fn insertion(src: &str, pos: usize, text: String) -> Edit {
    if pos == src.len() && !src.is_empty() && !src.ends_with('\n') {
        Edit::insert(pos, format!("\n{text}"))
    } else {
        Edit::insert(pos, text)
    }
}

/// The one edit of a patch that inserts whole lines: `lines` (text) indented by `indent`,
/// between the group's marker comments, at byte `pos` of `rel` (whose text is `src`).
fn marked_block(
    rel: String,
    src: &str,
    pos: usize,
    indent: &str,
    tag: &str,
    lines: &str,
) -> PatchEdit {
    let text = marker::wrap(indent, tag, &indent_lines(lines, indent));
    PatchEdit::Edits {
        rel,
        edits: vec![insertion(src, pos, text)],
    }
}

/// Code signal of the line-shaped kinds: whether every non-blank line of `block` (trimmed) is
/// a line of `text`.
fn lines_present(text: &str, block: &str) -> bool {
    let have: std::collections::HashSet<&str> = text.lines().map(str::trim).collect();
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .all(|l| have.contains(l))
}
