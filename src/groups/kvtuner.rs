//! `kvtuner`: the server arguments (`--enable-kvtuner-hicache`, `--kvtuner-hicache-*`).
//!
//! Era 0.5.20 - 0.5.23: memory arguments are fields of `class Memory(msgspec.Struct)`
//! (`sglang/srt/arg_groups/fields/memory.py`) and SGLang generates the CLI from them, so the
//! fields are the only thing to add: no `add_argument`, and `POSITIONAL_FIELD_ORDER` appends
//! unlisted fields by itself.

use crate::group::{BodyAt, ClassRef, Group, Patch, PatchKind, Snippet};

pub const ID: &str = "kvtuner";

pub const MEMORY_FIELDS_PY: &str = include_str!("../../patches/kvtuner/server_args_memory.py");

pub fn group() -> Group {
    Group {
        id: ID,
        summary:
            "server arguments --enable-kvtuner-hicache and --kvtuner-hicache-* (memory namespace)",
        patches: vec![Patch {
            id: "memory-fields",
            what: "KVTuner HiCache fields appended to class Memory",
            kind: PatchKind::ClassBody {
                class: ClassRef {
                    name: "Memory",
                    under: "sglang/srt",
                },
                at: BodyAt::End,
                block: Snippet::ClassBodyOf {
                    source: MEMORY_FIELDS_PY,
                    source_path: "patches/kvtuner/server_args_memory.py",
                    class: "KvtunerHicacheMemoryFields",
                },
                needs: &["A", "Arg", "Optional"],
            },
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::Python;
    use crate::syntax::{self, PyFile};

    /// The CLI contract: exactly these fields, in this order, from the embedded patch file.
    #[test]
    fn embedded_patch_declares_the_flags() {
        let f = PyFile::parse("server_args_memory.py", MEMORY_FIELDS_PY.to_string()).unwrap();
        assert!(f.syntax_error().is_none());
        let cls = syntax::classes(&f, "KvtunerHicacheMemoryFields")[0];
        let names: Vec<String> = syntax::body_statements(cls)
            .iter()
            .filter_map(|s| syntax::statement_binds(&f, *s))
            .collect();
        assert_eq!(
            names,
            [
                "enable_kvtuner_hicache",
                "kvtuner_hicache_nbits_key",
                "kvtuner_hicache_nbits_value",
                "kvtuner_hicache_asym",
                "kvtuner_hicache_axis_key",
                "kvtuner_hicache_axis_value",
                "kvtuner_hicache_q_group_size",
                "kvtuner_hicache_residual_length",
                "kvtuner_hicache_layer_config",
            ]
        );
        // The names the block may use are the ones the patch file itself imports.
        let PatchKind::ClassBody { needs, .. } = group().patches[0].kind else {
            panic!()
        };
        for n in needs {
            assert!(syntax::module_binds(&f, n), "{n}");
        }
        let fails = Python::pick(None)
            .compile_failures(&[("server_args_memory.py".into(), MEMORY_FIELDS_PY)])
            .unwrap();
        assert!(fails.is_empty(), "{fails:?}");
    }
}
