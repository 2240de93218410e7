//! Resolving the references anchors are written with ([`ClassRef`], [`FileRef`], [`FnRef`],
//! [`ListRef`]) to the one file and node they name on the tree as it is now.
//!
//! Every reference must match exactly once. Zero or several matches is [`Drift`]: the error
//! names the patch, the file (or folder searched), what was looked for and how many matches
//! were found, so a user of a newer SGLang learns at once what moved.

use crate::engine::sources::Sources;
use crate::engine::syntax::{self, PyFile};
use crate::patch::{ClassRef, FileRef, FnRef, ListRef};
use crate::refusal::Drift;
use anyhow::Result;
use tree_sitter::Node;

/// An anchor of `patch` looked for in `file` that matched `matches` times.
pub fn drift(
    patch: &str,
    file: &str,
    looked_for: String,
    matches: usize,
    locations: Vec<String>,
) -> anyhow::Error {
    anyhow::Error::new(Drift {
        patch: patch.to_string(),
        file: file.to_string(),
        looked_for,
        matches,
        locations,
        unread: Vec::new(),
    })
}

/// [`drift`] for an anchor searched for in a folder: names the files there it could not read.
fn search_drift(
    src: &Sources,
    patch: &str,
    under: &str,
    looked_for: String,
    locations: Vec<String>,
) -> anyhow::Error {
    anyhow::Error::new(Drift {
        patch: patch.to_string(),
        file: format!("{under}/"),
        looked_for,
        matches: locations.len(),
        locations,
        unread: src.unread_under(under),
    })
}

/// The file holding the one `class NAME` below `c.under` (loaded into `src`).
pub fn resolve_class(src: &mut Sources, tag: &str, c: ClassRef) -> Result<String> {
    let needle = format!("class {}", c.name);
    let candidates = src.files_containing(c.under, &needle)?;
    let mut locations = Vec::new();
    for rel in &candidates {
        let file = src.load(rel)?.expect("listed files exist");
        for node in syntax::classes(file, c.name) {
            locations.push(format!("{rel}:{}", node.start_position().row + 1));
        }
    }
    if locations.len() != 1 {
        return Err(search_drift(
            src,
            tag,
            c.under,
            format!("class `{}`", c.name),
            locations,
        ));
    }
    let rel = locations[0]
        .rsplit_once(':')
        .expect("rel:line")
        .0
        .to_string();
    Ok(rel)
}

/// The file a [`FileRef`] names, loaded into `src`; `what` is what the patch looks for in it
/// (for the drift report when there is no such file).
pub fn resolve_file(src: &mut Sources, tag: &str, file: FileRef, what: &str) -> Result<String> {
    match file {
        FileRef::Path(rel) => {
            load_required(src, tag, rel, what)?;
            Ok(rel.to_string())
        }
        FileRef::OfClass(class) => resolve_class(src, tag, class),
    }
}

/// The one `class NAME` of a file [`resolve_class`] found it in.
pub fn the_class<'t>(file: &'t PyFile, name: &str) -> Node<'t> {
    syntax::classes(file, name)[0]
}

/// The one node of `nodes`; none or several is drift (`what` was looked for in `file`).
pub fn exactly_one<'t>(
    tag: &str,
    file: &PyFile,
    what: impl FnOnce() -> String,
    nodes: Vec<Node<'t>>,
) -> Result<Node<'t>> {
    if nodes.len() == 1 {
        return Ok(nodes[0]);
    }
    let locations = if nodes.len() > 1 {
        nodes
            .iter()
            .map(|n| format!("line {}", n.start_position().row + 1))
            .collect()
    } else {
        Vec::new()
    };
    Err(drift(tag, &file.rel, what(), nodes.len(), locations))
}

fn load_required<'s>(src: &'s mut Sources, tag: &str, rel: &str, what: &str) -> Result<&'s PyFile> {
    match src.load(rel)? {
        Some(f) => Ok(f),
        None => Err(drift(
            tag,
            rel,
            format!("file holding {what}"),
            0,
            Vec::new(),
        )),
    }
}

/// The file holding the function `f` names, and the function's start byte.
pub fn function_node(src: &mut Sources, tag: &str, f: FnRef) -> Result<(String, usize)> {
    match f {
        FnRef::Module { file, name } => {
            let pf = load_required(src, tag, file, &format!("function `{name}`"))?;
            let node = exactly_one(
                tag,
                pf,
                || format!("function `{name}`"),
                syntax::functions(pf, name),
            )?;
            Ok((file.to_string(), node.start_byte()))
        }
        FnRef::ModuleUnder { under, name } => {
            let candidates = src.files_containing(under, &format!("def {name}"))?;
            let mut found = Vec::new();
            for rel in &candidates {
                let pf = src.load(rel)?.expect("listed files exist");
                for node in syntax::functions(pf, name) {
                    found.push((
                        rel.clone(),
                        node.start_byte(),
                        node.start_position().row + 1,
                    ));
                }
            }
            if found.len() != 1 {
                let locations = found.iter().map(|(r, _, l)| format!("{r}:{l}")).collect();
                return Err(search_drift(
                    src,
                    tag,
                    under,
                    format!("function `{name}`"),
                    locations,
                ));
            }
            let (rel, start, _) = found.remove(0);
            Ok((rel, start))
        }
        FnRef::Method { class, name } => {
            let rel = resolve_class(src, tag, class)?;
            let start = the_method(src, tag, &rel, class.name, name)?;
            Ok((rel, start))
        }
        FnRef::FirstMethodOf { class, names } => {
            let rel = resolve_class(src, tag, class)?;
            let pf = src.get(&rel).expect("loaded");
            let cls = the_class(pf, class.name);
            let Some(name) = names
                .iter()
                .find(|n| !syntax::methods(pf, cls, n).is_empty())
            else {
                return Err(drift(
                    tag,
                    &rel,
                    format!(
                        "one of the methods `{}` in class `{}`",
                        names.join("`, `"),
                        class.name
                    ),
                    0,
                    Vec::new(),
                ));
            };
            let start = the_method(src, tag, &rel, class.name, name)?;
            Ok((rel, start))
        }
    }
}

/// Start byte of the one method `name` of the one class `class` in `rel`; several is drift.
fn the_method(src: &Sources, tag: &str, rel: &str, class: &str, name: &str) -> Result<usize> {
    let pf = src.get(rel).expect("loaded");
    let cls = the_class(pf, class);
    let node = exactly_one(
        tag,
        pf,
        || format!("method `{name}` in class `{class}`"),
        syntax::methods(pf, cls, name),
    )?;
    Ok(node.start_byte())
}

/// The file holding the list literal `l` names, and the list's start byte.
pub fn list_node(src: &mut Sources, tag: &str, l: ListRef) -> Result<(String, usize)> {
    match l {
        ListRef::FieldKeyword {
            class,
            field,
            keyword,
        } => {
            let rel = resolve_class(src, tag, class)?;
            let pf = src.get(&rel).expect("loaded");
            let cls = the_class(pf, class.name);
            let decl = exactly_one(
                tag,
                pf,
                || format!("field `{field}` in class `{}`", class.name),
                syntax::fields(pf, cls, field),
            )?;
            let list = keyword_list(tag, pf, decl, keyword, || format!("field `{field}`"))?;
            Ok((rel, list.start_byte()))
        }
        ListRef::CallKeyword {
            file,
            callee,
            first_arg,
            keyword,
        } => {
            let rel = resolve_file(src, tag, file, &format!("`{callee}(\"{first_arg}\", ...)`"))?;
            let pf = src.get(&rel).expect("loaded");
            let call = exactly_one(
                tag,
                pf,
                || format!("call `{callee}(\"{first_arg}\", ...)`"),
                syntax::calls(pf, pf.root(), callee, Some(first_arg)),
            )?;
            let list = keyword_list(tag, pf, call, keyword, || {
                format!("`{callee}(\"{first_arg}\", ...)`")
            })?;
            Ok((rel, list.start_byte()))
        }
        ListRef::ContainingItem { function, has_item } => {
            let (rel, start) = function_node(src, tag, function)?;
            let pf = src.get(&rel).expect("loaded");
            let func = syntax::function_at(pf, start);
            let list = exactly_one(
                tag,
                pf,
                || {
                    format!(
                        "list literal containing `{has_item}` in function `{}`",
                        fn_name(function)
                    )
                },
                syntax::lists_with_item(pf, func, has_item),
            )?;
            Ok((rel, list.start_byte()))
        }
    }
}

/// The one `keyword=[...]` list literal among the keyword arguments of `node` (a call or an
/// annotated field), `in_what` naming `node` for the drift report.
fn keyword_list<'t>(
    tag: &str,
    pf: &'t PyFile,
    node: Node<'t>,
    keyword: &str,
    in_what: impl FnOnce() -> String,
) -> Result<Node<'t>> {
    exactly_one(
        tag,
        pf,
        || format!("`{keyword}=[...]` list in {}", in_what()),
        syntax::keyword_values(pf, node, keyword)
            .into_iter()
            .filter(|v| v.kind() == "list")
            .collect(),
    )
}

/// The one if/elif chain mentioning `chain_has` in the function starting at `func_start`.
pub fn chain_node<'t>(
    tag: &str,
    pf: &'t PyFile,
    func_start: usize,
    chain_has: &str,
) -> Result<Node<'t>> {
    let func = syntax::function_at(pf, func_start);
    exactly_one(
        tag,
        pf,
        || format!("if/elif chain mentioning `{chain_has}`"),
        syntax::if_chains(pf, func, chain_has),
    )
}

/// The function `f` names, as a drift report says it.
pub fn fn_name(f: FnRef) -> String {
    match f {
        FnRef::Module { name, .. }
        | FnRef::ModuleUnder { name, .. }
        | FnRef::Method { name, .. } => name.to_string(),
        FnRef::FirstMethodOf { names, .. } => names.join("` or `"),
    }
}

/// The one assignment to `target` in the function: the statement a block goes after.
pub fn assignment_node<'t>(
    tag: &str,
    pf: &'t PyFile,
    func: Node<'t>,
    function: FnRef,
    target: &str,
) -> Result<Node<'t>> {
    exactly_one(
        tag,
        pf,
        || {
            format!(
                "assignment `{target} = ...` in function `{}`",
                fn_name(function)
            )
        },
        syntax::assignments(pf, func, target),
    )
}
