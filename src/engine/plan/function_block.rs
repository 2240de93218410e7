//! [`PatchKind::FunctionStart`](crate::patch::PatchKind::FunctionStart) and
//! [`PatchKind::AfterAssign`](crate::patch::PatchKind::AfterAssign): a block inside a function,
//! as its first statements or right after one assignment. The block's lines inside the
//! function are the code signal.

use super::{lines_present, marked_block, Code, Planned};
use crate::engine::resolve::{assignment_node, drift, fn_name, function_node};
use crate::engine::snippet::snippet_lines;
use crate::engine::sources::Sources;
use crate::engine::syntax::{self, PyFile};
use crate::patch::{FnRef, Snippet, FIRST_PARAM};
use anyhow::{bail, Result};
use tree_sitter::Node;

/// `after_assign`: the target of the assignment the block goes after; `None` for the start
/// of the body.
pub fn plan(
    src: &mut Sources,
    tag: &str,
    function: FnRef,
    after_assign: Option<&str>,
    block: Snippet,
) -> Result<Planned> {
    let (rel, start) = function_node(src, tag, function)?;
    let pf = src.get(&rel).expect("loaded");
    let func = syntax::function_at(pf, start);
    let (pos, indent) = match after_assign {
        Some(target) => {
            let stmt = assignment_node(tag, pf, func, function, target)?;
            (
                syntax::line_end(&pf.src, stmt.end_byte()),
                syntax::indent_at(&pf.src, stmt.start_byte()).to_string(),
            )
        }
        None => body_start(tag, &rel, pf, func, function)?,
    };
    let lines = function_block(tag, pf, func, function, block)?;
    let code = Code::one(lines_present(pf.text(func), &lines));
    let edit = marked_block(rel.clone(), &pf.src, pos, &indent, tag, &lines);
    Ok(Planned { rel, code, edit })
}

/// Where the first statements of `func` go (after its docstring, which stays first: it is
/// what `help()` shows), and their indentation.
fn body_start(
    tag: &str,
    rel: &str,
    pf: &PyFile,
    func: Node,
    function: FnRef,
) -> Result<(usize, String)> {
    let stmts = syntax::body_statements(func);
    let Some(first) = stmts.first() else {
        bail!(
            "{tag}: {rel}: function `{}` has an empty body",
            fn_name(function)
        );
    };
    if first.start_position().row == func.start_position().row {
        bail!(
            "{tag}: {rel}:{}: the body of `{}` is on its `def` line; not supported",
            func.start_position().row + 1,
            fn_name(function)
        );
    }
    let indent = syntax::indent_at(&pf.src, first.start_byte()).to_string();
    let pos = if syntax::is_docstring(*first) {
        syntax::line_end(&pf.src, first.end_byte())
    } else {
        syntax::line_start(&pf.src, first.start_byte())
    };
    Ok((pos, indent))
}

/// A function-scoped block's lines with [`FIRST_PARAM`] replaced by the function's first
/// parameter; a function without one (when the block needs it) is drift.
fn function_block(
    tag: &str,
    pf: &PyFile,
    func: Node,
    function: FnRef,
    block: Snippet,
) -> Result<String> {
    let (lines, _) = snippet_lines(block)?;
    if !lines.contains(FIRST_PARAM) {
        return Ok(lines);
    }
    match syntax::first_parameter(pf, func) {
        Some(p) => Ok(lines.replace(FIRST_PARAM, &p)),
        None => Err(drift(
            tag,
            &pf.rel,
            format!(
                "a named first parameter of function `{}`",
                fn_name(function)
            ),
            0,
            vec![],
        )),
    }
}
