//! Parsing Python with tree-sitter, and the structural queries anchors are built from.
//!
//! Anchors are found by walking the concrete syntax tree, never by regex on text, so a
//! formatter moving whitespace or a comment mentioning a name cannot fool them. Each query
//! returns *all* matches; deciding that exactly one is required (and reporting drift
//! otherwise) is the caller's job (see `resolve.rs`).

use anyhow::{anyhow, Result};
use tree_sitter::{Node, Parser, Tree};

/// One Python source file: its path (relative to the folder holding `sglang/`), text and tree.
pub struct PyFile {
    pub rel: String,
    pub src: String,
    pub tree: Tree,
}

pub fn parse(src: &str) -> Result<Tree> {
    let mut parser = Parser::new();
    parser
        .set_language(&tree_sitter_python::LANGUAGE.into())
        .map_err(|e| anyhow!("tree-sitter-python grammar rejected: {e}"))?;
    parser
        .parse(src, None)
        .ok_or_else(|| anyhow!("tree-sitter gave up parsing"))
}

/// Deepest bracket nesting the engine parses. CPython itself refuses more than 200 levels, so
/// no importable module comes near; the limit keeps the recursive tree walks off the end of
/// the stack on a pathological file.
pub const MAX_NESTING: usize = 1000;

/// How deep `(`, `[` and `{` nest in `src`, outside comments and string literals.
pub fn bracket_depth(src: &str) -> usize {
    let b = src.as_bytes();
    let (mut depth, mut deepest, mut i) = (0usize, 0usize, 0usize);
    while i < b.len() {
        match b[i] {
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            q @ (b'\'' | b'"') => {
                let triple = b.get(i + 1) == Some(&q) && b.get(i + 2) == Some(&q);
                i += if triple { 3 } else { 1 };
                while i < b.len() {
                    if b[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if b[i] == q
                        && (!triple || (b.get(i + 1) == Some(&q) && b.get(i + 2) == Some(&q)))
                    {
                        i += if triple { 2 } else { 0 };
                        break;
                    }
                    if b[i] == b'\n' && !triple {
                        break;
                    }
                    i += 1;
                }
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    deepest
}

impl PyFile {
    pub fn parse(rel: impl Into<String>, src: String) -> Result<Self> {
        let rel = rel.into();
        let depth = bracket_depth(&src);
        if depth > MAX_NESTING {
            anyhow::bail!(
                "{rel}: brackets nest {depth} deep, more than the {MAX_NESTING} this tool parses \
                 (CPython refuses more than 200); refused"
            );
        }
        let tree = parse(&src)?;
        Ok(PyFile { rel, src, tree })
    }

    pub fn root(&self) -> Node<'_> {
        self.tree.root_node()
    }

    pub fn text(&self, node: Node) -> &str {
        &self.src[node.byte_range()]
    }

    /// First ERROR or MISSING node as "line L, column C: what", if the file does not parse.
    pub fn syntax_error(&self) -> Option<String> {
        first_error(&self.root())
    }
}

fn first_error(node: &Node) -> Option<String> {
    if !node.has_error() {
        return None;
    }
    if node.is_error() || node.is_missing() {
        let p = node.start_position();
        let what = if node.is_missing() {
            format!("missing {}", node.kind())
        } else {
            "syntax error".to_string()
        };
        return Some(format!(
            "line {}, column {}: {what}",
            p.row + 1,
            p.column + 1
        ));
    }
    let mut cursor = node.walk();
    for child in node.children(&mut cursor) {
        if let Some(e) = first_error(&child) {
            return Some(e);
        }
    }
    None
}

/// Preorder walk collecting nodes for which `keep` holds.
fn collect<'t>(node: Node<'t>, keep: &mut dyn FnMut(Node<'t>) -> bool, out: &mut Vec<Node<'t>>) {
    if keep(node) {
        out.push(node);
    }
    let mut cursor = node.walk();
    for child in node.named_children(&mut cursor) {
        collect(child, keep, out);
    }
}

/// `class NAME` definitions anywhere in the file (nested ones included).
pub fn classes<'t>(file: &'t PyFile, name: &str) -> Vec<Node<'t>> {
    let mut out = Vec::new();
    collect(
        file.root(),
        &mut |n| {
            n.kind() == "class_definition"
                && n.child_by_field_name("name")
                    .is_some_and(|id| file.text(id) == name)
        },
        &mut out,
    );
    out
}

/// The statements of a class or function body, comments excluded, in order.
pub fn body_statements<'t>(def: Node<'t>) -> Vec<Node<'t>> {
    let Some(body) = def.child_by_field_name("body") else {
        return Vec::new();
    };
    let mut cursor = body.walk();
    body.named_children(&mut cursor)
        .filter(|n| n.kind() != "comment")
        .collect()
}

/// Name bound by a class-body statement: `name: T = v`, `name = v`, `def name`, `class name`.
pub fn statement_binds(file: &PyFile, stmt: Node) -> Option<String> {
    let stmt = if stmt.kind() == "decorated_definition" {
        stmt.child_by_field_name("definition")?
    } else {
        stmt
    };
    match stmt.kind() {
        "function_definition" | "class_definition" => {
            Some(file.text(stmt.child_by_field_name("name")?).to_string())
        }
        "expression_statement" => {
            let inner = stmt.named_child(0)?;
            if inner.kind() != "assignment" {
                return None;
            }
            let left = inner.child_by_field_name("left")?;
            (left.kind() == "identifier").then(|| file.text(left).to_string())
        }
        _ => None,
    }
}

/// Class-body field declarations (`name: T = ...` or `name = ...`) named `name`.
pub fn fields<'t>(file: &'t PyFile, class: Node<'t>, name: &str) -> Vec<Node<'t>> {
    body_statements(class)
        .into_iter()
        .filter(|s| {
            s.kind() == "expression_statement" && statement_binds(file, *s).as_deref() == Some(name)
        })
        .collect()
}

/// Methods (plain or decorated) named `name` directly inside `class`.
pub fn methods<'t>(file: &'t PyFile, class: Node<'t>, name: &str) -> Vec<Node<'t>> {
    body_statements(class)
        .into_iter()
        .filter(|s| {
            matches!(s.kind(), "function_definition" | "decorated_definition")
                && statement_binds(file, *s).as_deref() == Some(name)
        })
        .collect()
}

/// Module-level `def name` (plain or decorated).
pub fn functions<'t>(file: &'t PyFile, name: &str) -> Vec<Node<'t>> {
    let mut cursor = file.root().walk();
    let stmts: Vec<Node<'t>> = file.root().named_children(&mut cursor).collect();
    stmts
        .into_iter()
        .filter(|s| {
            matches!(s.kind(), "function_definition" | "decorated_definition")
                && statement_binds(file, *s).as_deref() == Some(name)
        })
        .collect()
}

/// The `function_definition` of a plain or decorated definition.
pub fn function_def(node: Node) -> Node {
    if node.kind() == "decorated_definition" {
        node.child_by_field_name("definition").unwrap_or(node)
    } else {
        node
    }
}

/// Name of the first parameter of `func` (a `function_definition`), if it has a named one
/// (not `*args`, `**kw`, `*` or `/`).
pub fn first_parameter(file: &PyFile, func: Node) -> Option<String> {
    let params = func.child_by_field_name("parameters")?;
    let mut cursor = params.walk();
    let first = params
        .named_children(&mut cursor)
        .find(|n| n.kind() != "comment")?;
    let name = match first.kind() {
        "identifier" => first,
        // `name: T` has no `name` field; its first child is the identifier.
        "typed_parameter" => first.named_child(0)?,
        "default_parameter" | "typed_default_parameter" => first.child_by_field_name("name")?,
        _ => return None,
    };
    (name.kind() == "identifier").then(|| file.text(name).to_string())
}

/// Statements `name = ...` / `name: T = ...` anywhere under `scope`.
pub fn assignments<'t>(file: &'t PyFile, scope: Node<'t>, name: &str) -> Vec<Node<'t>> {
    let mut out = Vec::new();
    collect(
        scope,
        &mut |n| {
            n.kind() == "expression_statement" && statement_binds(file, n).as_deref() == Some(name)
        },
        &mut out,
    );
    out
}

/// A string-literal expression statement (a docstring when it comes first in a body).
pub fn is_docstring(stmt: Node) -> bool {
    stmt.kind() == "expression_statement"
        && stmt.named_child(0).is_some_and(|c| c.kind() == "string")
}

/// Calls to `callee` (a bare name or the last part of `obj.callee`) under `scope`, optionally
/// only those whose first positional argument is the string literal `first_arg`.
pub fn calls<'t>(
    file: &'t PyFile,
    scope: Node<'t>,
    callee: &str,
    first_arg: Option<&str>,
) -> Vec<Node<'t>> {
    let mut out = Vec::new();
    collect(
        scope,
        &mut |n| {
            if n.kind() != "call" {
                return false;
            }
            let Some(func) = n.child_by_field_name("function") else {
                return false;
            };
            let name = match func.kind() {
                "identifier" => file.text(func),
                "attribute" => func
                    .child_by_field_name("attribute")
                    .map(|a| file.text(a))
                    .unwrap_or(""),
                _ => "",
            };
            if name != callee {
                return false;
            }
            match first_arg {
                None => true,
                Some(want) => n
                    .child_by_field_name("arguments")
                    .and_then(|args| args.named_child(0))
                    .is_some_and(|a| {
                        a.kind() == "string" && string_value(file, a).as_deref() == Some(want)
                    }),
            }
        },
        &mut out,
    );
    out
}

/// Value nodes of `keyword=value` arguments named `keyword` anywhere under `scope`.
pub fn keyword_values<'t>(file: &'t PyFile, scope: Node<'t>, keyword: &str) -> Vec<Node<'t>> {
    let mut out = Vec::new();
    collect(
        scope,
        &mut |n| {
            n.kind() == "keyword_argument"
                && n.child_by_field_name("name")
                    .is_some_and(|k| file.text(k) == keyword)
        },
        &mut out,
    );
    out.into_iter()
        .filter_map(|k| k.child_by_field_name("value"))
        .collect()
}

/// List literals anywhere under `scope` with an item whose source text is `item` (e.g.
/// `"hf3fs"`); nested lists are searched too, but only a list's own items count.
pub fn lists_with_item<'t>(file: &'t PyFile, scope: Node<'t>, item: &str) -> Vec<Node<'t>> {
    let mut out = Vec::new();
    collect(
        scope,
        &mut |n| {
            if n.kind() != "list" {
                return false;
            }
            let mut cursor = n.walk();
            let found = n.named_children(&mut cursor).any(|c| file.text(c) == item);
            found
        },
        &mut out,
    );
    out
}

/// The value of a plain (non-f, single-part) string literal, quotes stripped.
pub fn string_value(file: &PyFile, node: Node) -> Option<String> {
    if node.kind() != "string" {
        return None;
    }
    let mut cursor = node.walk();
    let mut content = String::new();
    for c in node.named_children(&mut cursor) {
        match c.kind() {
            "string_content" => content.push_str(file.text(c)),
            "string_start" | "string_end" => {}
            _ => return None,
        }
    }
    Some(content)
}

/// `if` statements under `scope` whose own condition or any `elif` condition contains `needle`.
pub fn if_chains<'t>(file: &'t PyFile, scope: Node<'t>, needle: &str) -> Vec<Node<'t>> {
    let mut out = Vec::new();
    collect(
        scope,
        &mut |n| {
            n.kind() == "if_statement"
                && chain_conditions(file, n).iter().any(|c| c.contains(needle))
        },
        &mut out,
    );
    out
}

/// Condition texts of an if/elif chain, in order.
pub fn chain_conditions<'t>(file: &'t PyFile, if_stmt: Node<'t>) -> Vec<&'t str> {
    let mut conds = Vec::new();
    if let Some(c) = if_stmt.child_by_field_name("condition") {
        conds.push(file.text(c));
    }
    let mut cursor = if_stmt.walk();
    for clause in if_stmt.children_by_field_name("alternative", &mut cursor) {
        if clause.kind() == "elif_clause" {
            if let Some(c) = clause.child_by_field_name("condition") {
                conds.push(file.text(c));
            }
        }
    }
    conds
}

/// Whether the module binds `name` at top level (import, from-import, assignment, def, class).
pub fn module_binds(file: &PyFile, name: &str) -> bool {
    let root = file.root();
    let mut cursor = root.walk();
    for stmt in root.named_children(&mut cursor) {
        match stmt.kind() {
            "import_statement" | "import_from_statement" => {
                let mut c2 = stmt.walk();
                for n in stmt.children_by_field_name("name", &mut c2) {
                    let bound = match n.kind() {
                        "aliased_import" => n.child_by_field_name("alias").map(|a| file.text(a)),
                        // `import a.b` binds `a`
                        _ => file.text(n).split('.').next(),
                    };
                    if bound == Some(name) {
                        return true;
                    }
                }
            }
            _ => {
                if statement_binds(file, stmt).as_deref() == Some(name) {
                    return true;
                }
            }
        }
    }
    false
}

/// The statements at the top level of the file, comments included, in order.
pub fn module_statements<'t>(file: &'t PyFile) -> Vec<Node<'t>> {
    let root = file.root();
    let mut cursor = root.walk();
    let statements = root.named_children(&mut cursor).collect();
    statements
}

/// The statement (child of a module or block) that contains `node`.
pub fn enclosing_statement(node: Node) -> Node {
    let mut n = node;
    while let Some(p) = n.parent() {
        if matches!(p.kind(), "module" | "block") {
            return n;
        }
        n = p;
    }
    n
}

/// The innermost node of one of `kinds` holding byte `start`: a node found before, found again
/// (nodes cannot outlive the borrow of the file they came from).
pub fn node_at<'t>(file: &'t PyFile, start: usize, kinds: &[&str]) -> Node<'t> {
    let mut n = file
        .root()
        .descendant_for_byte_range(start, start)
        .expect("in range");
    while !kinds.contains(&n.kind()) {
        n = n.parent().expect("found by this kind before");
    }
    n
}

/// The plain or decorated definition holding byte `start`, as a `function_definition`.
pub fn function_at(file: &PyFile, start: usize) -> Node<'_> {
    function_def(node_at(
        file,
        start,
        &["function_definition", "decorated_definition"],
    ))
}

/// The items of a list literal, comments excluded, in order.
pub fn list_items(list: Node) -> Vec<Node> {
    let mut cursor = list.walk();
    list.named_children(&mut cursor)
        .filter(|n| n.kind() != "comment")
        .collect()
}

/// The `else:` clause of an if/elif chain, if it has one.
pub fn else_clause(if_stmt: Node) -> Option<Node> {
    let mut cursor = if_stmt.walk();
    let clause = if_stmt
        .children_by_field_name("alternative", &mut cursor)
        .find(|c| c.kind() == "else_clause");
    clause
}

/// The first statement of the `if` branch of an if/elif chain.
pub fn first_branch_statement(if_stmt: Node) -> Option<Node> {
    if_stmt
        .child_by_field_name("consequence")
        .and_then(|b| b.named_child(0))
}

/// Byte offset of the start of the line holding `byte`.
pub fn line_start(src: &str, byte: usize) -> usize {
    src[..byte].rfind('\n').map_or(0, |i| i + 1)
}

/// Byte offset just past the newline ending the line holding `byte` (or the end of the text).
pub fn line_end(src: &str, byte: usize) -> usize {
    src[byte..].find('\n').map_or(src.len(), |i| byte + i + 1)
}

/// The leading whitespace of the line holding `byte`.
pub fn indent_at(src: &str, byte: usize) -> &str {
    let start = line_start(src, byte);
    let line = &src[start..];
    let n = line.len() - line.trim_start_matches([' ', '\t']).len();
    &line[..n]
}

/// 1-based line number of `byte`.
pub fn line_of(src: &str, byte: usize) -> usize {
    src[..byte].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = r#"
import msgspec
from typing import Optional as Opt
from x import (A, Arg)

class Memory(msgspec.Struct):
    """doc"""
    a: A[int, Arg(help="x", choices=[1, 2])] = 1
    b = 2

    @staticmethod
    def m():
        if x == "file":
            pass
        elif x == "nixl":
            pass
        else:
            raise ValueError("no")

register_backend("file", "mod", "Cls")
"#;

    #[test]
    fn finds_structure() {
        let f = PyFile::parse("m.py", SRC.to_string()).unwrap();
        assert!(f.syntax_error().is_none());
        let cls = classes(&f, "Memory");
        assert_eq!(cls.len(), 1);
        assert_eq!(fields(&f, cls[0], "a").len(), 1);
        assert_eq!(fields(&f, cls[0], "b").len(), 1);
        assert_eq!(fields(&f, cls[0], "c").len(), 0);
        assert_eq!(methods(&f, cls[0], "m").len(), 1);
        assert_eq!(
            calls(&f, f.root(), "register_backend", Some("file")).len(),
            1
        );
        assert_eq!(
            calls(&f, f.root(), "register_backend", Some("nope")).len(),
            0
        );
        let lists = keyword_values(&f, cls[0], "choices");
        assert_eq!(lists.len(), 1);
        assert_eq!(lists[0].kind(), "list");
        let chains = if_chains(&f, cls[0], "\"nixl\"");
        assert_eq!(chains.len(), 1);
        assert_eq!(chain_conditions(&f, chains[0]).len(), 2);
        assert!(module_binds(&f, "Opt") && module_binds(&f, "Arg") && module_binds(&f, "msgspec"));
        assert!(!module_binds(&f, "Optional"));
    }

    #[test]
    fn first_parameters_and_assignments() {
        let src = "def a(x: int, y=1):\n    \"\"\"doc\"\"\"\n    cfg = x\n    if y:\n        cfg: int = 2\n\
                   def b(*args):\n    pass\n\
                   def c(z=3):\n    pass\n\
                   def d(w: int = 4):\n    pass\n\
                   def e(v, /):\n    pass\n";
        let f = PyFile::parse("m.py", src.to_string()).unwrap();
        assert!(f.syntax_error().is_none());
        let first = |name: &str| first_parameter(&f, function_def(functions(&f, name)[0]));
        assert_eq!(first("a").as_deref(), Some("x"));
        assert_eq!(first("b"), None);
        assert_eq!(first("c").as_deref(), Some("z"));
        assert_eq!(first("d").as_deref(), Some("w"));
        assert_eq!(first("e").as_deref(), Some("v"));
        let a = functions(&f, "a")[0];
        assert_eq!(assignments(&f, a, "cfg").len(), 2);
        assert_eq!(assignments(&f, a, "x").len(), 0);
        assert!(is_docstring(body_statements(a)[0]));
        assert!(!is_docstring(body_statements(a)[1]));
    }

    #[test]
    fn lists_are_found_by_an_item_of_their_own() {
        let src = "def f(x):\n    a = [\"hf3fs\", [\"nested\"]]\n    b = (\"hf3fs\",)\n    c = [\"x\", [\"hf3fs\"]]\n    return x in [\n        \"hf3fs\",  # comment\n    ]\n";
        let f = PyFile::parse("m.py", src.to_string()).unwrap();
        assert!(f.syntax_error().is_none());
        let rows = |item: &str| -> Vec<usize> {
            lists_with_item(&f, f.root(), item)
                .iter()
                .map(|n| n.start_position().row + 1)
                .collect()
        };
        // The tuple on line 3 is not a list; the outer list on line 4 does not hold it itself.
        assert_eq!(rows("\"hf3fs\""), vec![2, 4, 5]);
        assert_eq!(rows("\"nested\""), vec![2]);
        assert_eq!(rows("'hf3fs'"), Vec::<usize>::new());
    }

    #[test]
    fn reports_syntax_errors_with_position() {
        let f = PyFile::parse("bad.py", "class X:\n    a = (\n".to_string()).unwrap();
        assert!(f.syntax_error().unwrap().starts_with("line "));
    }

    #[test]
    fn bracket_depth_skips_strings_and_comments_and_deep_files_are_refused() {
        assert_eq!(bracket_depth("f(a[1], {2: (3,)})"), 3);
        assert_eq!(
            bracket_depth("s = '((((' # [[[[\nt = \"\"\"\n(((\n\"\"\"\nu = ('\\'(')"),
            1
        );
        let deep = format!("x = {}{}\n", "[".repeat(50_000), "]".repeat(50_000));
        let err = PyFile::parse("deep.py", deep).err().unwrap().to_string();
        assert!(err.contains("deep.py") && err.contains("50000"), "{err}");
    }
}
