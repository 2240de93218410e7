//! `kvtuner`: the server arguments (`--enable-kvtuner-hicache`, `--kvtuner-hicache-*`).
//!
//! One description of the ten flags, `patches/kvtuner/server_args_fields.py` (a real,
//! importable module: name, type, default, `choices` and help of each flag, declared the
//! way SGLang 0.5.14+ declares arguments), rendered into each era's syntax:
//!
//! | era | where | what is injected |
//! | --- | --- | --- |
//! | 0.5.20 - 0.5.23 | `class Memory(msgspec.Struct)`, `arg_groups/fields/memory.py` | the declarations as they are, at the end of the class |
//! | 0.5.17 - 0.5.19 | `@dataclass class ServerArgs`, `server_args.py` | the declarations with `NS("memory")` appended to each `A[...]`, after `hicache_storage_backend_extra_config` |
//! | 0.5.14 - 0.5.16 | `@dataclass class ServerArgs`, `server_args.py` | the declarations as they are, after `hicache_storage_backend_extra_config` |
//! | 0.5.3 - 0.5.13 | `@dataclass class ServerArgs` + `add_cli_args`, `server_args.py` | plain fields `name: T = default` after `hicache_storage_backend_extra_config`, and one `parser.add_argument(...)` per flag after `add_argument("--hicache-storage-backend-extra-config", ...)` |
//!
//! In the annotated eras SGLang generates the CLI from the fields, so the fields are all
//! there is to add. From 0.5.17 to 0.5.19 every `ServerArgs` field also names its namespace
//! (`NS("memory")` for the hicache ones); SGLang builds the runtime config bags from those
//! markers, so without it `get_memory().kvtuner_hicache_*` would not exist there. In the oldest era the CLI is hand-written, so the flags are rendered
//! here (see [`Flag`]) in that era's own style (`type=int`, `default=ServerArgs.<name>`,
//! `choices=[...]`, `action="store_true"`, `help=...`): one description, no second copy of
//! the help texts to keep in step.

use crate::group::{BodyAt, ClassRef, Group, Patch, PatchKind, Snippet};
use crate::syntax::{self, PyFile};
use crate::tree::Era;
use anyhow::{anyhow, bail, ensure, Result};
use std::sync::OnceLock;
use tree_sitter::Node;

pub const ID: &str = "kvtuner";

/// The one description of the flags (see the module docs).
pub const FIELDS_PY: &str = include_str!("../../patches/kvtuner/server_args_fields.py");
const FIELDS_PATH: &str = "patches/kvtuner/server_args_fields.py";
const FIELDS_CLASS: &str = "KvtunerHicacheFields";

/// Before 0.5.20 the hicache arguments are declared in `ServerArgs`; ours go right after the
/// last hicache one, which every release 0.5.3 - 0.5.19 has (checked by the release matrix).
const SERVER_ARGS: ClassRef = ClassRef {
    name: "ServerArgs",
    under: "sglang/srt",
};
const SERVER_ARGS_PY: &str = "sglang/srt/server_args.py";
const ANCHOR_FIELD: &str = "hicache_storage_backend_extra_config";
const ANCHOR_FLAG: &str = "--hicache-storage-backend-extra-config";

const SUMMARY: &str = "server arguments --enable-kvtuner-hicache and --kvtuner-hicache-*";
const HEADER: &str = "# KVTuner quantized hierarchical cache (injected by kvtuner-patch)";

fn annotated_fields() -> Snippet {
    Snippet::ClassBodyOf {
        source: FIELDS_PY,
        source_path: FIELDS_PATH,
        class: FIELDS_CLASS,
    }
}

/// The group's form for `era` (every supported era has one).
pub fn group(era: Era) -> Option<Group> {
    let patches = match era {
        Era::MemoryStruct => vec![Patch {
            id: "memory-fields",
            what: "KVTuner HiCache fields appended to class Memory",
            kind: PatchKind::ClassBody {
                class: ClassRef {
                    name: "Memory",
                    under: "sglang/srt",
                },
                at: BodyAt::End,
                block: annotated_fields(),
                needs: &["A", "Arg", "Optional"],
            },
        }],
        Era::NamespacedServerArgs => vec![Patch {
            id: "server-args-fields",
            what: "KVTuner HiCache annotated fields (namespace memory) in class ServerArgs",
            kind: PatchKind::ClassBody {
                class: SERVER_ARGS,
                at: BodyAt::AfterField(ANCHOR_FIELD),
                block: Snippet::ClassBodyOf {
                    source: namespaced_fields_py(),
                    source_path: NAMESPACED_PATH,
                    class: FIELDS_CLASS,
                },
                needs: &["A", "Arg", "NS", "Optional"],
            },
        }],
        Era::AnnotatedServerArgs => vec![Patch {
            id: "server-args-fields",
            what: "KVTuner HiCache annotated fields in class ServerArgs (CLI generated from them)",
            kind: PatchKind::ClassBody {
                class: SERVER_ARGS,
                at: BodyAt::AfterField(ANCHOR_FIELD),
                block: annotated_fields(),
                needs: &["A", "Arg", "Optional"],
            },
        }],
        Era::DataclassAddArgument => {
            let (fields, arguments) = dataclass_era_text();
            vec![
                Patch {
                    id: "server-args-fields",
                    what: "KVTuner HiCache dataclass fields in class ServerArgs",
                    kind: PatchKind::ClassBody {
                        class: SERVER_ARGS,
                        at: BodyAt::AfterField(ANCHOR_FIELD),
                        block: Snippet::Text(fields),
                        needs: &["Optional"],
                    },
                },
                Patch {
                    id: "cli-arguments",
                    what: "parser.add_argument calls for the KVTuner HiCache flags in ServerArgs.add_cli_args",
                    kind: PatchKind::AfterCall {
                        file: SERVER_ARGS_PY,
                        callee: "add_argument",
                        first_arg: Some(ANCHOR_FLAG),
                        block: Snippet::Text(arguments),
                    },
                },
            ]
        }
    };
    Some(Group {
        id: ID,
        summary: SUMMARY,
        patches,
    })
}

/// Rendered once per process: the embedded description cannot change while it runs.
fn dataclass_era_text() -> (&'static str, &'static str) {
    static TEXT: OnceLock<(String, String)> = OnceLock::new();
    let (f, a) = TEXT.get_or_init(|| {
        let flags = flags().expect("patches/kvtuner/server_args_fields.py is checked by tests");
        (
            render_dataclass_fields(&flags).expect("checked by tests"),
            render_add_arguments(&flags).expect("checked by tests"),
        )
    });
    (f, a)
}

const NAMESPACED_PATH: &str = "patches/kvtuner/server_args_fields.py (+ NS(\"memory\"))";
/// The namespace SGLang 0.5.17 - 0.5.19 gives the hicache fields.
const NAMESPACE: &str = "NS(\"memory\")";

/// `server_args_fields.py` with `NS("memory")` added as the last element of every `A[...]`.
fn namespaced_fields_py() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        with_namespace(FIELDS_PY)
            .expect("patches/kvtuner/server_args_fields.py is checked by tests")
    })
}

/// Insert `NS("memory"),` on its own line before the closing `]` of each declaration's
/// `A[...]` (which must be on a line of its own), indented like the type parameters.
fn with_namespace(source: &str) -> Result<String> {
    let pf = PyFile::parse(FIELDS_PATH, source.to_string())?;
    let [cls] = syntax::classes(&pf, FIELDS_CLASS)[..] else {
        bail!("{FIELDS_PATH}: expected one class `{FIELDS_CLASS}`");
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
            .ok_or_else(|| anyhow!("{FIELDS_PATH}: a declaration is not A[T, Arg(...)]"))?;
        let first = params
            .named_child(0)
            .ok_or_else(|| anyhow!("{FIELDS_PATH}: A[] without parameters"))?;
        let close = params.end_byte() - 1;
        let line = syntax::line_start(&pf.src, close);
        ensure!(
            pf.src[close..].starts_with(']') && pf.src[line..close].trim().is_empty(),
            "{FIELDS_PATH}:{}: the closing `]` of A[...] must start its line",
            syntax::line_of(&pf.src, close)
        );
        let indent = syntax::indent_at(&pf.src, first.start_byte());
        edits.push(crate::edit::Edit::insert(
            line,
            format!("{indent}{NAMESPACE},\n"),
        ));
    }
    crate::edit::apply_edits(&pf.src, &edits).map_err(|e| anyhow!("{FIELDS_PATH}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// The description, read from the patch file
// ---------------------------------------------------------------------------------------------

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

/// The flags declared in the body of `KvtunerHicacheFields`, in order.
pub fn flags() -> Result<Vec<Flag>> {
    let pf = PyFile::parse(FIELDS_PATH, FIELDS_PY.to_string())?;
    if let Some(e) = pf.syntax_error() {
        bail!("{FIELDS_PATH} does not parse: {e}");
    }
    let [cls] = syntax::classes(&pf, FIELDS_CLASS)[..] else {
        bail!("{FIELDS_PATH}: expected one class `{FIELDS_CLASS}`");
    };
    let mut out = Vec::new();
    for stmt in syntax::body_statements(cls) {
        let Some(assign) = stmt.named_child(0).filter(|n| n.kind() == "assignment") else {
            continue; // the docstring
        };
        out.push(flag(&pf, assign)?);
    }
    ensure!(!out.is_empty(), "{FIELDS_PATH}: no declarations");
    Ok(out)
}

fn flag(pf: &PyFile, assign: Node) -> Result<Flag> {
    let at = || format!("{FIELDS_PATH}:{}", assign.start_position().row + 1);
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

// ---------------------------------------------------------------------------------------------
// Rendering for the dataclass + add_argument era (unindented; the engine indents at the anchor)
// ---------------------------------------------------------------------------------------------

/// `name: T = default` lines for the `ServerArgs` dataclass.
pub fn render_dataclass_fields(flags: &[Flag]) -> Result<String> {
    let mut out = format!("{HEADER}\n");
    for f in flags {
        f.value_type()?;
        out.push_str(&format!("{}: {} = {}\n", f.name, f.ty, f.default));
    }
    Ok(out)
}

/// One `parser.add_argument(...)` per flag, in the style of `ServerArgs.add_cli_args`.
pub fn render_add_arguments(flags: &[Flag]) -> Result<String> {
    let mut out = format!("{HEADER}\n");
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
    use crate::python::Python;

    const NAMES: [&str; 10] = [
        "enable_kvtuner_hicache",
        "kvtuner_hicache_nbits_key",
        "kvtuner_hicache_nbits_value",
        "kvtuner_hicache_asym",
        "kvtuner_hicache_axis_key",
        "kvtuner_hicache_axis_value",
        "kvtuner_hicache_q_group_size",
        "kvtuner_hicache_residual_length",
        "kvtuner_hicache_layer_config",
        "kvtuner_hicache_codec",
    ];

    /// The CLI contract: exactly these flags, in this order, with these types, defaults and
    /// choices, read from the embedded patch file (what every era's rendering starts from).
    #[test]
    fn embedded_description_declares_the_flags() {
        let flags = flags().unwrap();
        let got: Vec<(&str, &str, &str, Option<&str>)> = flags
            .iter()
            .map(|f| {
                (
                    f.name.as_str(),
                    f.ty.as_str(),
                    f.default.as_str(),
                    f.choices.as_deref(),
                )
            })
            .collect();
        let nbits = Some("[2, 4, 8]");
        let axis = Some("[0, 1]");
        assert_eq!(
            got,
            [
                (NAMES[0], "bool", "False", None),
                (NAMES[1], "int", "4", nbits),
                (NAMES[2], "int", "4", nbits),
                (NAMES[3], "bool", "False", None),
                (NAMES[4], "int", "1", axis),
                (NAMES[5], "int", "0", axis),
                (NAMES[6], "int", "64", None),
                (NAMES[7], "int", "128", None),
                (NAMES[8], "Optional[str]", "None", None),
                (NAMES[9], "str", "\"auto\"", Some("[\"auto\", \"device\", \"host\"]")),
            ]
        );
        assert!(flags.iter().all(|f| !f.help.is_empty()));
        // The names the block may use are the ones the patch file itself imports.
        let pf = PyFile::parse(FIELDS_PATH, FIELDS_PY.to_string()).unwrap();
        // (`NS` exists in SGLang 0.5.17 - 0.5.19 only; the file targets 0.5.20+.)
        for era in Era::ALL {
            for p in group(era).unwrap().patches {
                if let PatchKind::ClassBody { needs, .. } = p.kind {
                    for n in needs.iter().filter(|n| **n != "NS") {
                        assert!(syntax::module_binds(&pf, n), "{era:?} {n}");
                    }
                }
            }
        }
        let fails = Python::pick(None)
            .compile_failures(&[
                ("server_args_fields.py".into(), FIELDS_PY),
                ("namespaced.py".into(), namespaced_fields_py()),
            ])
            .unwrap();
        assert!(fails.is_empty(), "{fails:?}");
        // One marker per declaration, as the last element of its A[...].
        let ns = namespaced_fields_py();
        assert_eq!(ns.matches("        NS(\"memory\"),\n    ] = ").count(), 10);
        assert_eq!(
            ns.len(),
            FIELDS_PY.len() + 10 * "        NS(\"memory\"),\n".len()
        );
    }

    /// The oldest era's rendering, run for real: a dataclass + argparse module built from it
    /// (the shape of SGLang's `ServerArgs.add_cli_args`) parses the flags with the declared
    /// defaults, types and choices, and the dataclass fields match the parsed namespace.
    #[test]
    fn dataclass_era_rendering_parses_with_argparse() {
        let (fields, arguments) = dataclass_era_text();
        let indent = |t: &str, by: &str| -> String {
            t.lines().map(|l| format!("{by}{l}\n")).collect::<String>()
        };
        let module = format!(
            "import argparse, dataclasses, sys\nfrom typing import Optional\n\n\
             @dataclasses.dataclass\nclass ServerArgs:\n{}\n    @staticmethod\n    def add_cli_args(parser):\n{}\n\
             p = argparse.ArgumentParser()\nServerArgs.add_cli_args(p)\n\
             d = vars(p.parse_args([]))\n\
             assert d == {{f.name: f.default for f in dataclasses.fields(ServerArgs)}}, d\n\
             a = p.parse_args(['--enable-kvtuner-hicache', '--kvtuner-hicache-nbits-key', '2', \
             '--kvtuner-hicache-asym', '--kvtuner-hicache-layer-config', 'l.yaml'])\n\
             s = ServerArgs(**vars(a))\n\
             assert (s.enable_kvtuner_hicache, s.kvtuner_hicache_nbits_key, s.kvtuner_hicache_nbits_value, \
             s.kvtuner_hicache_asym, s.kvtuner_hicache_layer_config) == (True, 2, 4, True, 'l.yaml'), s\n\
             try:\n    p.parse_args(['--kvtuner-hicache-axis-key', '2'])\n    sys.exit('choices not enforced')\n\
             except SystemExit as e:\n    assert e.code == 2, e\n\
             assert '--kvtuner-hicache-residual-length' in p.format_help()\nprint('ok')\n",
            indent(fields, "    "),
            indent(arguments, "        "),
        );
        let out = std::process::Command::new("python3")
            .args(["-c", &module])
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
            "{}\n{module}",
            String::from_utf8_lossy(&out.stderr)
        );
        for n in NAMES {
            assert!(fields.contains(&format!("\n{n}: ")), "{n}");
            let flag = format!("\"--{}\",", n.replace('_', "-"));
            assert!(arguments.contains(&flag), "{flag}");
        }
    }

    #[test]
    fn renderer_refuses_what_it_cannot_express() {
        let f = |ty: &str, default: &str| Flag {
            name: "x".into(),
            ty: ty.into(),
            default: default.into(),
            choices: None,
            help: vec!["\"h\"".into()],
        };
        assert!(render_add_arguments(&[f("bool", "True")]).is_err());
        assert!(render_add_arguments(&[f("List[int]", "None")]).is_err());
        assert!(render_dataclass_fields(&[f("dict", "None")]).is_err());
        let ok = render_add_arguments(&[f("Optional[float]", "None")]).unwrap();
        assert!(ok.contains("    type=float,\n    default=ServerArgs.x,\n    help=\"h\",\n"));
    }
}
