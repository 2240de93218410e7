//! [`PatchKind::ClassBody`](crate::patch::PatchKind::ClassBody): a block in the body of a
//! class, at its end or after a field or method. The code signal is how many of the names the
//! block binds the class already binds.

use super::{marked_block, Code, Planned};
use crate::engine::resolve::{drift, exactly_one, resolve_class, the_class};
use crate::engine::snippet::snippet_lines;
use crate::engine::sources::Sources;
use crate::engine::syntax::{self, PyFile};
use crate::patch::{BodyAt, ClassRef, Snippet};
use anyhow::{bail, Result};
use tree_sitter::Node;

pub fn plan(
    src: &mut Sources,
    tag: &str,
    class: ClassRef,
    at: BodyAt,
    block: Snippet,
    needs: &[&str],
) -> Result<Planned> {
    let rel = resolve_class(src, tag, class)?;
    let pf = src.get(&rel).expect("loaded");
    for name in needs {
        if !syntax::module_binds(pf, name) {
            return Err(drift(
                tag,
                &rel,
                format!("module-level import or definition of `{name}`"),
                0,
                vec![],
            ));
        }
    }
    let cls = the_class(pf, class.name);
    let (pos, indent) = position(pf, tag, cls, class, at)?;
    let (lines, names) = snippet_lines(block)?;
    let have: Vec<String> = syntax::body_statements(cls)
        .iter()
        .filter_map(|s| syntax::statement_binds(pf, *s))
        .collect();
    let code = Code::Present {
        present: names.iter().filter(|n| have.contains(n)).count(),
        total: names.len(),
    };
    let edit = marked_block(rel.clone(), &pf.src, pos, &indent, tag, &lines);
    Ok(Planned { rel, code, edit })
}

/// Where in the body of `class` the block goes, and the body's indentation.
fn position(
    file: &PyFile,
    tag: &str,
    class: Node,
    c: ClassRef,
    at: BodyAt,
) -> Result<(usize, String)> {
    let stmts = syntax::body_statements(class);
    let Some(first) = stmts.first() else {
        bail!("{}: class `{}` has an empty body", file.rel, c.name);
    };
    let indent = syntax::indent_at(&file.src, first.start_byte()).to_string();
    let after = match at {
        BodyAt::End => *stmts.last().expect("non-empty"),
        BodyAt::AfterField(name) => exactly_one(
            tag,
            file,
            || format!("field `{name}` in class `{}`", c.name),
            syntax::fields(file, class, name),
        )?,
        BodyAt::AfterMethod(name) => exactly_one(
            tag,
            file,
            || format!("method `{name}` in class `{}`", c.name),
            syntax::methods(file, class, name),
        )?,
    };
    Ok((syntax::line_end(&file.src, after.end_byte()), indent))
}
