//! [`PatchKind::ElifBranch`](crate::patch::PatchKind::ElifBranch): an `elif` clause, between
//! markers, before the `else:` of an if/elif chain (or after its last branch).

use super::{insertion, Code, Planned};
use crate::engine::edit::PatchEdit;
use crate::engine::marker;
use crate::engine::resolve::{chain_node, function_node};
use crate::engine::snippet::{indent_lines, snippet_lines};
use crate::engine::sources::Sources;
use crate::engine::syntax;
use crate::patch::{FnRef, Snippet};
use anyhow::Result;

pub fn plan(
    src: &mut Sources,
    tag: &str,
    function: FnRef,
    chain_has: &str,
    condition: &str,
    body: Snippet,
) -> Result<Planned> {
    let (rel, func_start) = function_node(src, tag, function)?;
    let pf = src.get(&rel).expect("loaded");
    let chain = chain_node(tag, pf, func_start, chain_has)?;
    let code = Code::one(syntax::chain_conditions(pf, chain).contains(&condition));
    let indent = syntax::indent_at(&pf.src, chain.start_byte()).to_string();
    let inner = syntax::first_branch_statement(chain)
        .map(|s| syntax::indent_at(&pf.src, s.start_byte()).to_string())
        .unwrap_or_else(|| format!("{indent}    "));
    let (lines, _) = snippet_lines(body)?;
    let clause = format!(
        "{indent}elif {condition}:\n{}",
        indent_lines(&lines, &inner)
    );
    let text = marker::wrap(&indent, tag, &clause);
    let pos = match syntax::else_clause(chain) {
        Some(e) => syntax::line_start(&pf.src, e.start_byte()),
        None => syntax::line_end(&pf.src, chain.end_byte()),
    };
    let edit = PatchEdit::Edits {
        rel: rel.clone(),
        edits: vec![insertion(&pf.src, pos, text)],
    };
    Ok(Planned { rel, code, edit })
}
