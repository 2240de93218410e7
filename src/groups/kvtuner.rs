//! `kvtuner`: the server arguments (`--enable-kvtuner-hicache`, `--kvtuner-hicache-*`).
//!
//! One description of the flags, `patches/kvtuner_hicache/server_args_fields.py` (a real,
//! importable module: name, type, default, `choices` and help of each flag, declared the
//! way SGLang 0.5.14+ declares arguments), written into each era's syntax (per era, where and
//! what: `docs/compat.md`). In the annotated eras SGLang generates the CLI from the fields, so
//! the fields are all there is to add; from 0.5.17 to 0.5.19 every `ServerArgs` field also
//! names its namespace (`NS("memory")` for the hicache ones), from which SGLang builds the
//! runtime config bags (`get_memory().kvtuner_hicache_*`). In the oldest era the CLI is
//! hand-written, so the engine renders dataclass fields and `add_argument` calls from the
//! same description (`engine/declarations.rs`).

use crate::engine::declarations;
use crate::era::Era;
use crate::patch::{BodyAt, ClassRef, DeclarationForm, FileRef, Group, Patch, PatchKind, Snippet};

pub const ID: &str = "kvtuner";

/// The one description of the flags (see the module docs).
pub const FIELDS_PY: &str = include_str!("../../patches/kvtuner_hicache/server_args_fields.py");
const FIELDS_PATH: &str = "patches/kvtuner_hicache/server_args_fields.py";
const FIELDS_CLASS: &str = "KvtunerHicacheFields";

/// Before 0.5.20 the hicache arguments are declared in `ServerArgs`; ours go right after the
/// last hicache one, which every release 0.5.3 - 0.5.19 has (checked by the release matrix).
const SERVER_ARGS: ClassRef = ClassRef {
    name: "ServerArgs",
    under: "sglang/srt",
};
const ANCHOR_FIELD: &str = "hicache_storage_backend_extra_config";
const ANCHOR_FLAG: &str = "--hicache-storage-backend-extra-config";
/// The namespace SGLang 0.5.17 - 0.5.19 gives the hicache fields.
const NAMESPACE: &str = "NS(\"memory\")";

const SUMMARY: &str = "server arguments --enable-kvtuner-hicache and --kvtuner-hicache-*";
const HEADING: &str = "# KVTuner quantized hierarchical cache (injected by kvtuner-patch)";

/// The declarations of [`FIELDS_PY`], written in `form`.
const fn declarations(form: DeclarationForm) -> Snippet {
    Snippet::Declarations {
        source: FIELDS_PY,
        source_path: FIELDS_PATH,
        class: FIELDS_CLASS,
        form,
    }
}

/// The declarations as they are.
const ANNOTATED: Snippet = Snippet::ClassBodyOf {
    source: FIELDS_PY,
    source_path: FIELDS_PATH,
    class: FIELDS_CLASS,
};

/// The flags as declared in [`FIELDS_PY`], in order: what tests count and name flags from.
pub fn flags() -> Vec<declarations::Flag> {
    declarations::read(FIELDS_PY, FIELDS_PATH, FIELDS_CLASS).expect("the embedded file parses")
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
                block: ANNOTATED,
                needs: &["A", "Arg", "Optional"],
            },
        }],
        Era::NamespacedServerArgs => vec![Patch {
            id: "server-args-fields",
            what: "KVTuner HiCache annotated fields (namespace memory) in class ServerArgs",
            kind: PatchKind::ClassBody {
                class: SERVER_ARGS,
                at: BodyAt::AfterField(ANCHOR_FIELD),
                block: declarations(DeclarationForm::Namespaced(NAMESPACE)),
                needs: &["A", "Arg", "NS", "Optional"],
            },
        }],
        Era::AnnotatedServerArgs => vec![Patch {
            id: "server-args-fields",
            what: "KVTuner HiCache annotated fields in class ServerArgs (CLI generated from them)",
            kind: PatchKind::ClassBody {
                class: SERVER_ARGS,
                at: BodyAt::AfterField(ANCHOR_FIELD),
                block: ANNOTATED,
                needs: &["A", "Arg", "Optional"],
            },
        }],
        Era::DataclassAddArgument => vec![
            Patch {
                id: "server-args-fields",
                what: "KVTuner HiCache dataclass fields in class ServerArgs",
                kind: PatchKind::ClassBody {
                    class: SERVER_ARGS,
                    at: BodyAt::AfterField(ANCHOR_FIELD),
                    block: declarations(DeclarationForm::DataclassFields { heading: HEADING }),
                    needs: &["Optional"],
                },
            },
            Patch {
                id: "cli-arguments",
                what: "parser.add_argument calls for the KVTuner HiCache flags in ServerArgs.add_cli_args",
                kind: PatchKind::AfterCall {
                    file: FileRef::OfClass(SERVER_ARGS),
                    callee: "add_argument",
                    first_arg: Some(ANCHOR_FLAG),
                    block: declarations(DeclarationForm::AddArguments { heading: HEADING }),
                },
            },
        ],
    };
    Some(Group {
        id: ID,
        summary: SUMMARY,
        patches,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::python::Python;
    use crate::engine::syntax::{self, PyFile};

    fn namespaced_fields_py() -> String {
        declarations::with_namespace(FIELDS_PY, FIELDS_PATH, FIELDS_CLASS, NAMESPACE).unwrap()
    }

    /// The oldest era's two renderings, as the engine writes them.
    fn dataclass_era_text() -> (String, String) {
        let flags = flags();
        (
            declarations::dataclass_fields(&flags, HEADING).unwrap(),
            declarations::add_arguments(&flags, HEADING).unwrap(),
        )
    }

    /// The declared flag names, in order.
    fn names() -> Vec<String> {
        flags().into_iter().map(|f| f.name).collect()
    }

    /// The CLI contract: exactly these flags, in this order, with these types, defaults and
    /// choices, read from the embedded patch file (what every era's rendering starts from).
    #[test]
    fn embedded_description_declares_the_flags() {
        let flags = flags();
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
                ("enable_kvtuner_hicache", "bool", "False", None),
                ("kvtuner_hicache_nbits_key", "int", "4", nbits),
                ("kvtuner_hicache_nbits_value", "int", "4", nbits),
                ("kvtuner_hicache_asym", "bool", "False", None),
                ("kvtuner_hicache_axis_key", "int", "1", axis),
                ("kvtuner_hicache_axis_value", "int", "0", axis),
                ("kvtuner_hicache_q_group_size", "int", "64", None),
                ("kvtuner_hicache_residual_length", "int", "128", None),
                ("kvtuner_hicache_sink_tokens", "int", "1", None),
                (
                    "kvtuner_hicache_layer_config",
                    "Optional[str]",
                    "None",
                    None
                ),
                (
                    "kvtuner_hicache_codec",
                    "str",
                    "\"auto\"",
                    Some("[\"auto\", \"device\", \"host\"]")
                ),
            ]
        );
        assert!(flags.iter().all(|f| !f.help.is_empty()));
        // The names the block may use are the ones the patch file itself imports.
        let pf = PyFile::parse(FIELDS_PATH, FIELDS_PY.to_string()).unwrap();
        // (`NS` exists in SGLang 0.5.17 - 0.5.19 only; the file targets 0.5.20+.)
        for era in Era::all() {
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
                ("namespaced.py".into(), &namespaced_fields_py()),
            ])
            .unwrap();
        assert!(fails.is_empty(), "{fails:?}");
        // One marker per declaration, as the last element of its A[...].
        let ns = namespaced_fields_py();
        assert_eq!(
            ns.matches("        NS(\"memory\"),\n    ] = ").count(),
            names().len()
        );
        assert_eq!(
            ns.len(),
            FIELDS_PY.len() + names().len() * "        NS(\"memory\"),\n".len()
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
            indent(&fields, "    "),
            indent(&arguments, "        "),
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
        for n in names() {
            assert!(fields.contains(&format!("\n{n}: ")), "{n}");
            let flag = format!("\"--{}\",", n.replace('_', "-"));
            assert!(arguments.contains(&flag), "{flag}");
        }
    }
}
