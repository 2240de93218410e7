//! `juicefs`: the JuiceFS HiCache storage backend as a built-in `--hicache-storage-backend`
//! choice, every era from SGLang 0.5.3. Needs `hostpool` (see `REGISTRY`): the backend
//! module lives in the package that group injects.
//!
//! - the subpackage `patches/kvtuner_hicache/juicefs/` into that package;
//! - `"juicefs"` among the choices of `--hicache-storage-backend` (argparse accepts it):
//!   - from 0.5.14: in the `choices=[...]` of the `hicache_storage_backend` field, declared
//!     in `class Memory` from 0.5.20, in `class ServerArgs` in 0.5.14 - 0.5.19;
//!   - 0.5.3 - 0.5.13.post1: the CLI is `parser.add_argument("--hicache-storage-backend",
//!     choices=[...])` in `ServerArgs.add_cli_args(parser)`, and up to 0.5.10.post1 that list
//!     sits on one line, where a marked block of whole lines cannot go; the form appends the
//!     choice to the argparse action that call created, right after it (the same statement in
//!     all 26 releases, one-line list or not);
//! - `StorageBackendFactory.register_backend("juicefs", ...)` next to the `"file"` one (the
//!   factory's registry knows it);
//! - an `elif backend_name == "juicefs":` branch in `_create_builtin_backend`, which builds
//!   every registered backend: like the other third-party stores there it gets
//!   `(storage_config, mem_pool_host)`; its options come from `storage_config.extra_config`
//!   (`--hicache-storage-backend-extra-config`), and the cache controller calls
//!   `register_mem_pool_host` on it afterwards as on every backend;
//! - `"juicefs"` among the backends `HiCacheController` sends down the zero-copy path
//!   (`_page_get_zero_copy` / `_page_set_zero_copy`, which call the backend's `batch_get_v1` /
//!   `batch_set_v1` with host indices). The choice is an unnamed list holding `"hf3fs"`:
//!   multi-line from 0.5.20, where `"juicefs"` joins it; in 0.5.3 - 0.5.19 it sits on one line
//!   inside an `if` condition (`in ["hf3fs", ...]`), so there the same choice is an
//!   `elif self.storage_backend_type == "juicefs":` branch of that `if`, setting the same two
//!   zero-copy functions. The `if` is in `attach_storage_backend` from 0.5.9 and in
//!   `HiCacheController.__init__` before.

use crate::era::Era;
use crate::patch::{ClassRef, FileRef, FnRef, Group, ListRef, Patch, PatchKind, Snippet};

pub const ID: &str = "juicefs";

const FACTORY: ClassRef = ClassRef {
    name: "StorageBackendFactory",
    under: "sglang/srt",
};

/// The zero-copy choice for `juicefs` as a branch of the `if` testing the one-line list
/// (0.5.14 - 0.5.19): what that `if` does for the listed backends.
const ZERO_COPY_BRANCH: &str = "
self.page_get_func = self._page_get_zero_copy
self.page_set_func = self._page_set_zero_copy
";

/// Written in the file's own style for registrations that do not fit one line.
const REGISTER: &str = concat!(
    r#"
StorageBackendFactory.register_backend(
    "juicefs",
    ""#,
    kvtuner_package!(module),
    r#".juicefs",
    "JuiceFSStorage",
)
"#
);

/// 0.5.3 - 0.5.13.post1: the choice added to the action `parser.add_argument(...)` just made
/// (its list may be on one line; see the module docs).
const CHOICE_ACTION: &str = r#"
parser._option_string_actions["--hicache-storage-backend"].choices.append("juicefs")
"#;

/// The class holding the server arguments up to 0.5.19.
const SERVER_ARGS: ClassRef = ClassRef {
    name: "ServerArgs",
    under: "sglang/srt",
};

/// `"juicefs"` in the `choices=[...]` of the `hicache_storage_backend` field of `class`.
fn choice_in_field(class: &'static str) -> PatchKind {
    PatchKind::ListItem {
        list: ListRef::FieldKeyword {
            class: ClassRef {
                name: class,
                under: "sglang/srt",
            },
            field: "hicache_storage_backend",
            keyword: "choices",
        },
        item: "\"juicefs\"",
    }
}

/// The group's form for `era` (every era has one).
pub fn group(era: Era) -> Option<Group> {
    let controller = ClassRef {
        name: "HiCacheController",
        under: "sglang/srt",
    };
    let attach = FnRef::Method {
        class: controller,
        name: "attach_storage_backend",
    };
    let zero_copy_branch = |function| PatchKind::ElifBranch {
        function,
        chain_has: "\"hf3fs\"",
        condition: "self.storage_backend_type == \"juicefs\"",
        body: Snippet::Text(ZERO_COPY_BRANCH),
    };
    let (choice, zero_copy) = match era {
        Era::MemoryStruct => (
            choice_in_field("Memory"),
            PatchKind::ListItem {
                list: ListRef::ContainingItem {
                    function: attach,
                    has_item: "\"hf3fs\"",
                },
                item: "\"juicefs\"",
            },
        ),
        Era::NamespacedServerArgs | Era::AnnotatedServerArgs => {
            (choice_in_field("ServerArgs"), zero_copy_branch(attach))
        }
        Era::DataclassAddArgument => (
            PatchKind::AfterCall {
                file: FileRef::OfClass(SERVER_ARGS),
                callee: "add_argument",
                first_arg: Some("--hicache-storage-backend"),
                block: Snippet::Text(CHOICE_ACTION),
            },
            zero_copy_branch(FnRef::FirstMethodOf {
                class: controller,
                names: &["attach_storage_backend", "__init__"],
            }),
        ),
    };
    Some(Group {
        id: ID,
        summary: "JuiceFS HiCache storage backend (--hicache-storage-backend juicefs)",
        patches: vec![
            package_module!("backend-storage", "juicefs/storage.py"),
            package_module!("backend-init", "juicefs/__init__.py"),
            package_module!("backend-options", "juicefs/options.py"),
            package_module!("backend-page-file", "juicefs/page_file.py"),
            package_module!("backend-volume", "juicefs/volume.py"),
            package_module!("backend-eviction", "juicefs/eviction.py"),
            package_module!("backend-page-io", "juicefs/page_io.py"),
            package_module!("backend-capacity", "juicefs/capacity.py"),
            package_module!("backend-presence", "juicefs/presence.py"),
            package_module!("backend-pools", "juicefs/pools.py"),
            Patch {
                id: "choice",
                what: "\"juicefs\" among the --hicache-storage-backend choices",
                kind: choice,
            },
            Patch {
                id: "register",
                what: "register_backend(\"juicefs\", ...) after the \"file\" registration",
                kind: PatchKind::AfterCall {
                    file: FileRef::OfClass(FACTORY),
                    callee: "register_backend",
                    first_arg: Some("file"),
                    block: Snippet::Text(REGISTER),
                },
            },
            Patch {
                id: "builtin-branch",
                what: "juicefs branch in StorageBackendFactory._create_builtin_backend",
                kind: PatchKind::ElifBranch {
                    function: FnRef::Method {
                        class: FACTORY,
                        name: "_create_builtin_backend",
                    },
                    chain_has: "\"file\"",
                    condition: "backend_name == \"juicefs\"",
                    body: Snippet::Text("return backend_class(storage_config, mem_pool_host)"),
                },
            },
            Patch {
                id: "zero-copy",
                what: "\"juicefs\" among the zero-copy (v1) backends of attach_storage_backend",
                kind: zero_copy,
            },
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The backend goes into a subpackage of the package `hostpool` injects, under the class
    /// name the module really defines, and every module of `patches/kvtuner_hicache/juicefs/` is
    /// injected (a module added there cannot be forgotten here).
    #[test]
    fn backend_file_sits_in_the_hostpool_package_and_names_its_class() {
        let g = group(Era::newest()).unwrap();
        let PatchKind::InjectFile { dest, source } = g.patches[0].kind else {
            panic!("first patch injects the backend")
        };
        assert_eq!(
            dest,
            format!("{}/juicefs/storage.py", crate::groups::PACKAGE_DIR)
        );
        assert!(source.contains("\nclass JuiceFSStorage(HiCacheStorage):"));
        assert!(REGISTER.contains("\"JuiceFSStorage\""));
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("patches/kvtuner_hicache/juicefs");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".py"))
            .collect();
        on_disk.sort();
        let mut injected: Vec<String> = g
            .patches
            .iter()
            .filter_map(|p| match p.kind {
                PatchKind::InjectFile { dest, .. } => Some(dest.rsplit('/').next()?.to_string()),
                _ => None,
            })
            .collect();
        injected.sort();
        assert_eq!(injected, on_disk);
    }

    /// The zero-copy path calls `batch_get_v1` / `batch_set_v1`: the backend must have both.
    #[test]
    fn zero_copy_backend_has_the_v1_batch_methods() {
        let g = group(Era::newest()).unwrap();
        let PatchKind::InjectFile { source, .. } = g.patches[0].kind else {
            panic!("first patch injects the backend")
        };
        assert!(g.patches.iter().any(|p| p.id == "zero-copy"));
        for m in ["batch_get_v1", "batch_set_v1"] {
            assert!(source.contains(&format!("\n    def {m}(")), "{m}");
        }
    }
}
