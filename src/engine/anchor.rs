//! Anchors: a [`Patch`] looked up once on a concrete tree ([`locate`]); from that one lookup
//! both whether it is already there ([`PatchState`]) and the edits that would apply it
//! ([`PatchEdit`]).
//!
//! Every anchor must match exactly once. Zero or several matches is [`Drift`]: the error
//! names the patch, the file (or folder searched), what was looked for and how many matches
//! were found, so a user of a newer SGLang learns at once what moved. Indentation of an
//! inserted block is taken from the anchor it goes next to.

use crate::engine::declarations;
use crate::engine::edit::Edit;
use crate::engine::marker;
use crate::engine::sources::Sources;
use crate::engine::syntax::{self, PyFile};
use crate::patch::{
    BodyAt, ClassRef, DeclarationForm, FileRef, FnRef, Group, ListRef, Patch, PatchKind, Snippet,
    FIRST_PARAM,
};
use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use std::fmt;
use tree_sitter::Node;

/// An anchor that did not match exactly once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drift {
    /// `group/patch`.
    pub patch: String,
    /// File (or folder searched) where the anchor was looked for.
    pub file: String,
    pub looked_for: String,
    pub matches: usize,
    /// Where the matches were, when there were several.
    pub locations: Vec<String>,
    /// Files of a searched folder that were not read (not regular, too large, ...), with why:
    /// the anchor may be in one of them.
    pub unread: Vec<String>,
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: looked for {}: found {} match{} (expected exactly 1)",
            self.patch,
            self.file,
            self.looked_for,
            self.matches,
            if self.matches == 1 { "" } else { "es" }
        )?;
        if !self.locations.is_empty() {
            write!(f, " at {}", self.locations.join(", "))?;
        }
        if !self.unread.is_empty() {
            write!(f, "; not read: {}", self.unread.join(", "))?;
        }
        Ok(())
    }
}

impl std::error::Error for Drift {}

fn drift(
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

/// What one patch changes on the tree as it is now.
#[derive(Debug, Clone)]
pub enum PatchEdit {
    Edits { rel: String, edits: Vec<Edit> },
    Create { rel: String, text: String },
}

/// Whether one patch is in the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum PatchState {
    Applied,
    NotApplied,
    Drifted(DriftReason),
}

/// Why a patch counts as drifted: the tree is not what the patch expects. Kept typed up to
/// the report and the exit code; shown (and serialised) as one line naming the patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriftReason {
    /// An anchor did not match exactly once (the patch cannot be placed or checked).
    AnchorNotFound(Drift),
    /// The begin/end markers in the file do not pair up.
    BrokenMarkers { rel: String, error: String },
    /// A marked block whose content no longer matches its marker hash.
    BlockEdited { tag: String, at: Vec<String> },
    /// The injected code is there without markers.
    CodeWithoutMarkers { tag: String, rel: String },
    /// Markers without the injected code.
    MarkersWithoutCode { tag: String, rel: String },
    /// Some, not all, of the injected definitions.
    Partial {
        tag: String,
        rel: String,
        present: usize,
        total: usize,
    },
    /// An injected file whose content no longer matches its header hash.
    InjectedFileEdited { tag: String, rel: String },
    /// A file where one would be injected, not written by kvtuner-patch.
    ForeignFile { tag: String, rel: String },
    /// This patch is missing while other patches of its group are there.
    MissingFromGroup { tag: String, rel: String },
}

impl DriftReason {
    /// Whether the anchor itself was found (every reason but [`DriftReason::AnchorNotFound`]).
    pub fn anchor_found(&self) -> bool {
        !matches!(self, DriftReason::AnchorNotFound(_))
    }
}

impl fmt::Display for DriftReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriftReason::AnchorNotFound(d) => write!(f, "{d}"),
            DriftReason::BrokenMarkers { rel, error } => write!(f, "{rel}: broken markers: {error}"),
            DriftReason::BlockEdited { tag, at } => write!(
                f,
                "{tag}: injected block edited by hand (content hash differs from its marker) at {}",
                at.join(", ")
            ),
            DriftReason::CodeWithoutMarkers { tag, rel } => write!(
                f,
                "{tag}: {rel}: the code is present but without kvtuner-patch markers (added by hand, or upstream now has it)"
            ),
            DriftReason::MarkersWithoutCode { tag, rel } => write!(
                f,
                "{tag}: {rel}: markers present but the injected code is missing"
            ),
            DriftReason::Partial {
                tag,
                rel,
                present,
                total,
            } => write!(
                f,
                "{tag}: {rel}: only {present} of {total} injected definitions present"
            ),
            DriftReason::InjectedFileEdited { tag, rel } => write!(
                f,
                "{tag}: {rel}: injected file edited by hand (hash differs from its header)"
            ),
            DriftReason::ForeignFile { tag, rel } => write!(
                f,
                "{tag}: {rel}: exists but was not written by kvtuner-patch"
            ),
            DriftReason::MissingFromGroup { tag, rel } => write!(
                f,
                "{tag}: {rel}: not applied, but other patches of the group are"
            ),
        }
    }
}

/// Serialised as the line it prints (the JSON report's `detail`).
impl Serialize for DriftReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A patch's anchor resolved once on the tree as it is now; its state and its edits both
/// come from that one lookup, so detection and planning cannot disagree.
#[derive(Debug, Clone)]
pub struct Located {
    /// Package-relative file the patch lives in.
    pub rel: String,
    pub state: PatchState,
    /// What applying the patch to the tree as it is now would change (meaningful when the
    /// state is [`PatchState::NotApplied`]).
    pub edit: PatchEdit,
}

/// The outcome of looking a patch up: located, or an anchor that did not match exactly once.
#[derive(Debug, Clone)]
pub enum Lookup {
    Found(Located),
    NotFound(Drift),
}

impl Lookup {
    /// The located patch, or the drift as an error (for callers to whom drift is a failure).
    pub fn found(self) -> Result<Located> {
        match self {
            Lookup::Found(l) => Ok(l),
            Lookup::NotFound(d) => Err(d.into()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Resolving anchors
// ---------------------------------------------------------------------------------------------

/// The file holding the one `class NAME` below `c.under` (loaded into `src`).
fn resolve_class(src: &mut Sources, tag: &str, c: ClassRef) -> Result<String> {
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
fn resolve_file(src: &mut Sources, tag: &str, file: FileRef, what: &str) -> Result<String> {
    match file {
        FileRef::Path(rel) => {
            load_required(src, tag, rel, what)?;
            Ok(rel.to_string())
        }
        FileRef::OfClass(class) => resolve_class(src, tag, class),
    }
}

fn the_class<'t>(file: &'t PyFile, name: &str) -> Node<'t> {
    syntax::classes(file, name)[0]
}

fn exactly_one<'t>(
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

/// The statement (child of a module or block) that contains `node`.
fn enclosing_statement(node: Node) -> Node {
    let mut n = node;
    while let Some(p) = n.parent() {
        if matches!(p.kind(), "module" | "block") {
            return n;
        }
        n = p;
    }
    n
}

fn class_anchor(
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

fn function_node(src: &mut Sources, tag: &str, f: FnRef) -> Result<(String, usize)> {
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

/// Find the function again from its start byte (nodes cannot outlive the borrow of `src`).
fn node_at<'t>(file: &'t PyFile, start: usize, kinds: &[&str]) -> Node<'t> {
    let mut n = file
        .root()
        .descendant_for_byte_range(start, start)
        .expect("in range");
    while !kinds.contains(&n.kind()) {
        n = n.parent().expect("found by this kind before");
    }
    n
}

fn list_node(src: &mut Sources, tag: &str, l: ListRef) -> Result<(String, usize)> {
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
            let func = the_function(pf, start);
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

fn chain_node<'t>(
    tag: &str,
    pf: &'t PyFile,
    func_start: usize,
    chain_has: &str,
) -> Result<Node<'t>> {
    let func = node_at(
        pf,
        func_start,
        &["function_definition", "decorated_definition"],
    );
    exactly_one(
        tag,
        pf,
        || format!("if/elif chain mentioning `{chain_has}`"),
        syntax::if_chains(pf, func, chain_has),
    )
}

fn fn_name(f: FnRef) -> String {
    match f {
        FnRef::Module { name, .. }
        | FnRef::ModuleUnder { name, .. }
        | FnRef::Method { name, .. } => name.to_string(),
        FnRef::FirstMethodOf { names, .. } => names.join("` or `"),
    }
}

/// The `function_definition` found by [`function_node`] (decorators unwrapped).
fn the_function(pf: &PyFile, start: usize) -> Node<'_> {
    syntax::function_def(node_at(
        pf,
        start,
        &["function_definition", "decorated_definition"],
    ))
}

/// The one assignment to `target` in the function: the statement a block goes after.
fn assignment_node<'t>(
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

// ---------------------------------------------------------------------------------------------
// Snippets
// ---------------------------------------------------------------------------------------------

/// Unindented lines of a snippet (each ending in `\n`) and the names its statements bind.
fn snippet_lines(s: Snippet) -> Result<(String, Vec<String>)> {
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
        None => {
            let root = pf.root();
            let mut c = root.walk();
            let stmts: Vec<Node> = root.named_children(&mut c).collect();
            stmts
                .into_iter()
                .filter_map(|n| syntax::statement_binds(&pf, n))
                .collect()
        }
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
fn indent_lines(text: &str, indent: &str) -> String {
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

/// Text inserted at `pos`; adds the missing newline when inserting at the end of a file
/// that does not end with one.
fn insertion(src: &str, pos: usize, text: String) -> Edit {
    if pos == src.len() && !src.is_empty() && !src.ends_with('\n') {
        Edit::insert(pos, format!("\n{text}"))
    } else {
        Edit::insert(pos, text)
    }
}

/// The one edit of a patch that inserts whole lines: `lines` (text) indented by `indent`, between the
/// group's marker comments, at byte `pos` of `rel` (whose text is `src`).
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

// ---------------------------------------------------------------------------------------------
// Locating a patch: one lookup, from which both its state and its edits follow
// ---------------------------------------------------------------------------------------------

/// Look `patch` up on the tree as it is now. An anchor that does not match exactly once is
/// [`Lookup::NotFound`]; an error is anything else (I/O, an embedded snippet that does not
/// parse, an anchor shape the engine cannot edit).
pub fn locate(src: &mut Sources, group: &Group, patch: &Patch) -> Result<Lookup> {
    let tag = group.tag(patch);
    match resolve(src, &tag, patch) {
        Ok((rel, code, edit)) => {
            let state = match code {
                Code::File(state) => state,
                Code::Present { present, total } => {
                    let text = src.text(&rel)?.expect("resolved files exist");
                    combine(&tag, &rel, present, total, text)
                }
            };
            Ok(Lookup::Found(Located { rel, state, edit }))
        }
        Err(e) => e.downcast::<Drift>().map(Lookup::NotFound),
    }
}

/// The code signal of a located patch: how much of the injected code is in the file (combined
/// with the marker signal by [`combine`]), or, for an injected file, its state outright.
enum Code {
    Present { present: usize, total: usize },
    File(PatchState),
}

/// The file, code signal and edits of `patch` on the tree as it is now.
fn resolve(src: &mut Sources, tag: &str, patch: &Patch) -> Result<(String, Code, PatchEdit)> {
    let one = |present: bool| Code::Present {
        present: present as usize,
        total: 1,
    };
    match patch.kind {
        PatchKind::InjectFile { dest, source } => {
            let state = match src.text(dest)? {
                None => PatchState::NotApplied,
                Some(text) => match marker::check_file_header(tag, text) {
                    Some(true) => PatchState::Applied,
                    Some(false) => PatchState::Drifted(DriftReason::InjectedFileEdited {
                        tag: tag.into(),
                        rel: dest.into(),
                    }),
                    None => PatchState::Drifted(DriftReason::ForeignFile {
                        tag: tag.into(),
                        rel: dest.into(),
                    }),
                },
            };
            let edit = PatchEdit::Create {
                rel: dest.to_string(),
                text: format!("{}{source}", marker::file_header(tag, source)),
            };
            Ok((dest.to_string(), Code::File(state), edit))
        }
        PatchKind::ClassBody {
            class,
            at,
            block,
            needs,
        } => {
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
            let (pos, indent) = class_anchor(pf, tag, cls, class, at)?;
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
            Ok((rel, code, edit))
        }
        PatchKind::AfterCall {
            file,
            callee,
            first_arg,
            block,
        } => {
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
            let stmt = enclosing_statement(call);
            let indent = syntax::indent_at(&pf.src, stmt.start_byte()).to_string();
            let (lines, _) = snippet_lines(block)?;
            let pos = syntax::line_end(&pf.src, stmt.end_byte());
            let code = one(lines_present(&pf.src, &lines));
            let edit = marked_block(rel.clone(), &pf.src, pos, &indent, tag, &lines);
            Ok((rel, code, edit))
        }
        PatchKind::ListItem { list, item } => {
            let (rel, start) = list_node(src, tag, list)?;
            let pf = src.get(&rel).expect("loaded");
            let list = node_at(pf, start, &["list"]);
            if list.start_position().row == list.end_position().row {
                bail!(
                    "{tag}: {rel}:{}: list is on one line; only multi-line lists are supported",
                    list.start_position().row + 1
                );
            }
            let mut cursor = list.walk();
            let items: Vec<Node> = list
                .named_children(&mut cursor)
                .filter(|n| n.kind() != "comment")
                .collect();
            let Some(last) = items.last() else {
                bail!("{tag}: {rel}: list is empty; nothing to take indentation from")
            };
            let code = one(items.iter().any(|n| pf.text(*n) == item));
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
                bail!("{tag}: {rel}: the closing `]` of the list shares a line with an item; not supported");
            }
            let text = marker::wrap(&indent, tag, &format!("{indent}{item},\n"));
            edits.push(Edit::insert(syntax::line_start(&pf.src, close), text));
            let edit = PatchEdit::Edits {
                rel: rel.clone(),
                edits,
            };
            Ok((rel, code, edit))
        }
        PatchKind::ElifBranch {
            function,
            chain_has,
            condition,
            body,
        } => {
            let (rel, func_start) = function_node(src, tag, function)?;
            let pf = src.get(&rel).expect("loaded");
            let chain = chain_node(tag, pf, func_start, chain_has)?;
            let code = one(syntax::chain_conditions(pf, chain).contains(&condition));
            let indent = syntax::indent_at(&pf.src, chain.start_byte()).to_string();
            let inner = chain
                .child_by_field_name("consequence")
                .and_then(|b| b.named_child(0))
                .map(|s| syntax::indent_at(&pf.src, s.start_byte()).to_string())
                .unwrap_or_else(|| format!("{indent}    "));
            let (lines, _) = snippet_lines(body)?;
            let clause = format!(
                "{indent}elif {condition}:\n{}",
                indent_lines(&lines, &inner)
            );
            let text = marker::wrap(&indent, tag, &clause);
            let mut cursor = chain.walk();
            let else_clause = chain
                .children_by_field_name("alternative", &mut cursor)
                .find(|c| c.kind() == "else_clause");
            let pos = match else_clause {
                Some(e) => syntax::line_start(&pf.src, e.start_byte()),
                None => syntax::line_end(&pf.src, chain.end_byte()),
            };
            let edit = PatchEdit::Edits {
                rel: rel.clone(),
                edits: vec![insertion(&pf.src, pos, text)],
            };
            Ok((rel, code, edit))
        }
        // The block's lines inside the function are the code signal.
        PatchKind::FunctionStart { function, block }
        | PatchKind::AfterAssign {
            function, block, ..
        } => {
            let (rel, start) = function_node(src, tag, function)?;
            let pf = src.get(&rel).expect("loaded");
            let func = the_function(pf, start);
            let (pos, indent) = match patch.kind {
                PatchKind::AfterAssign { target, .. } => {
                    let stmt = assignment_node(tag, pf, func, function, target)?;
                    (
                        syntax::line_end(&pf.src, stmt.end_byte()),
                        syntax::indent_at(&pf.src, stmt.start_byte()).to_string(),
                    )
                }
                _ => body_start(tag, &rel, pf, func, function)?,
            };
            let lines = function_block(tag, pf, func, function, block)?;
            let code = one(lines_present(pf.text(func), &lines));
            let edit = marked_block(rel.clone(), &pf.src, pos, &indent, tag, &lines);
            Ok((rel, code, edit))
        }
    }
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

/// Combine the code signal (how much of the injected code is there) with the marker signal.
fn combine(tag: &str, rel: &str, present: usize, total: usize, file_text: &str) -> PatchState {
    let blocks = match marker::find_blocks(file_text) {
        Ok(b) => b.into_iter().filter(|b| b.tag == tag).collect::<Vec<_>>(),
        Err(error) => {
            return PatchState::Drifted(DriftReason::BrokenMarkers {
                rel: rel.into(),
                error,
            })
        }
    };
    let edited: Vec<String> = blocks
        .iter()
        .filter(|b| !b.intact())
        .map(|b| format!("{rel}:{}", b.line))
        .collect();
    let (tag, rel) = (tag.to_string(), rel.to_string());
    let reason = match (present, blocks.is_empty()) {
        (0, true) => return PatchState::NotApplied,
        (p, false) if p == total && edited.is_empty() => return PatchState::Applied,
        (p, false) if p == total => DriftReason::BlockEdited { tag, at: edited },
        (p, true) if p == total => DriftReason::CodeWithoutMarkers { tag, rel },
        (0, false) => DriftReason::MarkersWithoutCode { tag, rel },
        (present, _) => DriftReason::Partial {
            tag,
            rel,
            present,
            total,
        },
    };
    PatchState::Drifted(reason)
}
