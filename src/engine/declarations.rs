//! Flag declarations read from a patch file and written out in other eras' syntax.
//!
//! A group declares its server arguments once, the way SGLang 0.5.14+ does
//! (`name: A[T, Arg(help=..., choices=[...])] = default` in the body of a class of a real `.py`
//! file under `patches/`). For older eras the engine renders that one description
//! ([`Snippet::Declarations`](crate::patch::Snippet::Declarations)): with a namespace marker
//! added to each `A[...]`, as plain dataclass fields, or as `parser.add_argument(...)` calls in
//! the style of a hand-written `add_cli_args` (`type=int`, `default=ServerArgs.<name>`,
//! `choices=[...]`, `action="store_true"`, `help=...`): no second copy of the help texts to
//! keep in step. Renderings are unindented; the engine indents them at the anchor.

use crate::engine::syntax::{self, PyFile};
use anyhow::{anyhow, bail, ensure, Result};
use tree_sitter::Node;

/// `source` with `marker` (e.g. `NS("memory")`) on its own line before the closing `]` of
/// each declaration's `A[...]` (which must be on a line of its own), indented like the type
/// parameters.
pub fn with_namespace(source: &str, path: &str, class: &str, marker: &str) -> Result<String> {
    let pf = PyFile::parse(path, source.to_string())?;
    let [cls] = syntax::classes(&pf, class)[..] else {
        bail!("{path}: expected one class `{class}`");
    };
    let mut edits = Vec::new();
    for stmt in syntax::body_statements(cls) {
        let Some(assign) = stmt.named_child(0).filter(|n| n.kind() == "assignment") else {
            continue;
        };
        let params = assign
            .child_by_field_name("type")
            .and_then(|t| t.named_child(0))
            .filter(|g| g.kind() == "generic_type")
            .and_then(|g| g.named_child(1))
            .ok_or_else(|| anyhow!("{path}: a declaration is not A[T, Arg(...)]"))?;
        let first = params
            .named_child(0)
            .ok_or_else(|| anyhow!("{path}: A[] without parameters"))?;
        let close = params.end_byte() - 1;
        let line = syntax::line_start(&pf.src, close);
        ensure!(
            pf.src[close..].starts_with(']') && pf.src[line..close].trim().is_empty(),
            "{path}:{}: the closing `]` of A[...] must start its line",
            syntax::line_of(&pf.src, close)
        );
        let indent = syntax::indent_at(&pf.src, first.start_byte());
        edits.push(crate::engine::edit::Edit::insert(
            line,
            format!("{indent}{marker},\n"),
        ));
    }
    crate::engine::edit::apply_edits(&pf.src, &edits).map_err(|e| anyhow!("{path}: {e}"))
}

/// One flag as declared in `server_args_fields.py`: `name: A[T, Arg(help=..., choices=...)] = default`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    /// Field name (`kvtuner_hicache_nbits_key`); the flag is its `--kebab-case` form.
    pub name: String,
    /// Type as written (`int`, `bool`, `Optional[str]`).
    pub ty: String,
    /// Default as written (`4`, `False`, `None`).
    pub default: String,
    /// `choices` list as written (`[2, 4, 8]`), if any.
    pub choices: Option<String>,
    /// The help text's string literals as written (implicitly concatenated), in order.
    pub help: Vec<String>,
}

impl Flag {
    pub fn cli_name(&self) -> String {
        format!("--{}", self.name.replace('_', "-"))
    }

    /// argparse `type=` for a value flag (`None` for a `bool` switch).
    fn value_type(&self) -> Result<Option<&str>> {
        let inner = self
            .ty
            .strip_prefix("Optional[")
            .and_then(|t| t.strip_suffix(']'))
            .unwrap_or(&self.ty);
        match inner {
            "bool" if self.ty == "bool" => {
                ensure!(
                    self.default == "False",
                    "{}: a bool flag must default to False (it renders as store_true)",
                    self.name
                );
                Ok(None)
            }
            "int" | "float" | "str" => Ok(Some(inner)),
            other => bail!(
                "{}: type `{other}` has no add_argument rendering (bool, int, float, str, Optional[...])",
                self.name
            ),
        }
    }
}

/// The flags declared in the body of `class` in `source` (a file at `path`), in order.
pub fn read(source: &str, path: &str, class: &str) -> Result<Vec<Flag>> {
    let pf = PyFile::parse(path, source.to_string())?;
    if let Some(e) = pf.syntax_error() {
        bail!("{path} does not parse: {e}");
    }
    let [cls] = syntax::classes(&pf, class)[..] else {
        bail!("{path}: expected one class `{class}`");
    };
    let mut out = Vec::new();
    for stmt in syntax::body_statements(cls) {
        let Some(assign) = stmt.named_child(0).filter(|n| n.kind() == "assignment") else {
            continue; // the docstring
        };
        out.push(flag(&pf, path, assign)?);
    }
    ensure!(!out.is_empty(), "{path}: no declarations");
    Ok(out)
}

fn flag(pf: &PyFile, path: &str, assign: Node) -> Result<Flag> {
    let at = || format!("{path}:{}", assign.start_position().row + 1);
    let field = |name: &str| {
        assign
            .child_by_field_name(name)
            .ok_or_else(|| anyhow!("{}: declaration without {name}", at()))
    };
    let name = pf.text(field("left")?).to_string();
    let default = pf.text(field("right")?).to_string();
    // `A[T, Arg(...)]`: a generic type whose parameters are the type and the Arg call.
    let params: Vec<Node> = {
        let ty = field("type")?;
        let generic = ty
            .named_child(0)
            .filter(|g| g.kind() == "generic_type")
            .ok_or_else(|| anyhow!("{}: `{name}` is not declared as A[T, Arg(...)]", at()))?;
        let list = generic
            .named_child(1)
            .ok_or_else(|| anyhow!("{}: `{name}`: A[...] without parameters", at()))?;
        let mut c = list.walk();
        list.named_children(&mut c).collect()
    };
    let [ty, arg] = params[..] else {
        bail!("{}: `{name}`: expected A[T, Arg(...)]", at());
    };
    let calls = syntax::calls(pf, arg, "Arg", None);
    let [call] = calls[..] else {
        bail!("{}: `{name}`: the second parameter must be Arg(...)", at());
    };
    let kw = |k: &str| syntax::keyword_values(pf, call, k).into_iter().next();
    let help_node = kw("help").ok_or_else(|| anyhow!("{}: `{name}`: Arg without help", at()))?;
    let mut help = Vec::new();
    collect_strings(pf, help_node, &mut help);
    ensure!(
        !help.is_empty()
            && help
                .iter()
                .all(|s| s.starts_with('"') && !s.starts_with("\"\"\"")),
        "{}: `{name}`: help must be plain \"...\" string literals",
        at()
    );
    Ok(Flag {
        name,
        ty: pf.text(ty).to_string(),
        default,
        choices: kw("choices").map(|c| pf.text(c).to_string()),
        help,
    })
}

/// Source text of every string literal under `node`, in order.
fn collect_strings(pf: &PyFile, node: Node, out: &mut Vec<String>) {
    if node.kind() == "string" {
        out.push(pf.text(node).to_string());
        return;
    }
    let mut c = node.walk();
    for child in node.named_children(&mut c) {
        collect_strings(pf, child, out);
    }
}

/// `name: T = default` lines for the `ServerArgs` dataclass, under `heading`.
pub fn dataclass_fields(flags: &[Flag], heading: &str) -> Result<String> {
    let mut out = format!("{heading}\n");
    for f in flags {
        f.value_type()?;
        out.push_str(&format!("{}: {} = {}\n", f.name, f.ty, f.default));
    }
    Ok(out)
}

/// One `parser.add_argument(...)` per flag, in the style of `ServerArgs.add_cli_args`, under
/// `heading`.
pub fn add_arguments(flags: &[Flag], heading: &str) -> Result<String> {
    let mut out = format!("{heading}\n");
    for f in flags {
        out.push_str("parser.add_argument(\n");
        out.push_str(&format!("    \"{}\",\n", f.cli_name()));
        match f.value_type()? {
            None => out.push_str("    action=\"store_true\",\n"),
            Some(t) => {
                out.push_str(&format!("    type={t},\n"));
                out.push_str(&format!("    default=ServerArgs.{},\n", f.name));
                if let Some(c) = &f.choices {
                    out.push_str(&format!("    choices={c},\n"));
                }
            }
        }
        for (i, s) in f.help.iter().enumerate() {
            let lead = if i == 0 { "help=" } else { "" };
            let end = if i + 1 == f.help.len() { "," } else { "" };
            out.push_str(&format!("    {lead}{s}{end}\n"));
        }
        out.push_str(")\n");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renderer_refuses_what_it_cannot_express() {
        let f = |ty: &str, default: &str| Flag {
            name: "x".into(),
            ty: ty.into(),
            default: default.into(),
            choices: None,
            help: vec!["\"h\"".into()],
        };
        assert!(add_arguments(&[f("bool", "True")], "#").is_err());
        assert!(add_arguments(&[f("List[int]", "None")], "#").is_err());
        assert!(dataclass_fields(&[f("dict", "None")], "#").is_err());
        let ok = add_arguments(&[f("Optional[float]", "None")], "#").unwrap();
        assert!(ok.contains("    type=float,\n    default=ServerArgs.x,\n    help=\"h\",\n"));
    }
}
