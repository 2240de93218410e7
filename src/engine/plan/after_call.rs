//! [`PatchKind::AfterCall`](crate::patch::PatchKind::AfterCall): a block after the statement
//! holding one call, such as a `register_backend(...)` line.

use super::{lines_present, marked_block, Code, Planned};
use crate::engine::resolve::{exactly_one, resolve_file};
use crate::engine::snippet::snippet_lines;
use crate::engine::sources::Sources;
use crate::engine::syntax;
use crate::patch::{FileRef, Snippet};
use anyhow::Result;

pub fn plan(
    src: &mut Sources,
    tag: &str,
    file: FileRef,
    callee: &str,
    first_arg: Option<&str>,
    block: Snippet,
) -> Result<Planned> {
    let what = format!(
        "call `{callee}({})`",
        first_arg
            .map(|a| format!("\"{a}\", ..."))
            .unwrap_or("...".into())
    );
    let rel = resolve_file(src, tag, file, &what)?;
    let pf = src.get(&rel).expect("loaded");
    let call = exactly_one(
        tag,
        pf,
        || what.clone(),
        syntax::calls(pf, pf.root(), callee, first_arg),
    )?;
    let stmt = syntax::enclosing_statement(call);
    let indent = syntax::indent_at(&pf.src, stmt.start_byte()).to_string();
    let (lines, _) = snippet_lines(block)?;
    let pos = syntax::line_end(&pf.src, stmt.end_byte());
    let code = Code::one(lines_present(&pf.src, &lines));
    let edit = marked_block(rel.clone(), &pf.src, pos, &indent, tag, &lines);
    Ok(Planned { rel, code, edit })
}
