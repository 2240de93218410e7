//! `hostpool`: the quantizing HiCache host pool, every era from SGLang 0.5.3.
//!
//! - the package `patches/kvtuner_hicache/` (its modules; the `juicefs/` subpackage is the
//!   `juicefs` group's) becomes `sglang.srt.mem_cache.kvtuner_hicache`;
//! - the dense MHA host pool class is chosen by `select_mha_host_pool_cls`, which answers only
//!   with `--enable-kvtuner-hicache` (so without the flag SGLang builds its stock pool):
//!   - from 0.5.14: first thing in `get_mha_host_pool_cls`, the one place these releases
//!     pick the class (module-level in `mem_cache/memory_pool_host.py` in 0.5.14 - 0.5.15, in
//!     `mem_cache/pool_host/mha.py` from 0.5.16; found as the one such `def` under
//!     `mem_cache`). Its parameter is the device pool up to 0.5.22 and the `MHABufferInfo` in
//!     0.5.23: the call passes `{first_param}`, and the injected class tells the two apart;
//!   - 0.5.3 - 0.5.13.post1 have no such function: `HiRadixCache.__init__`, the decode
//!     offload manager, the MTP draft pools (0.5.11+) and `build_kv_host_pool` (0.5.11+, through
//!     a conditional expression, not a call) each name `MHATokenToKVPoolHost` themselves, all
//!     passing the device pool first. The choice goes into that class instead: a `__new__`
//!     (the class has none in these releases) that, for the stock class itself, asks the
//!     selection and returns an instance of the quantizing subclass, whose `__init__` Python
//!     then runs with the same arguments. One anchor serves every call site, and the class is
//!     chosen before any buffer is allocated;
//! - the MLA host pool class chooses itself in every era: a `__new__` in
//!   `MLATokenToKVPoolHost` (the class has none in any release) asks `select_mla_host_pool_cls`
//!   with the constructor's arguments and returns the quantizing subclass, or the stock class
//!   for configurations it cannot mirror (one startup line says why). The call sites name the
//!   class themselves in every release (`build_kv_host_pool` hard-codes it in 0.5.23), so the
//!   class is the one anchor they all share;
//! - where the scheduler process finds the server arguments: 0.5.3 and 0.5.3.post1 have no
//!   process-wide slot for them (`get_global_server_args` appears in 0.5.3.post2), so the
//!   oldest era's form also hands `run_scheduler_process`'s `server_args` to the package
//!   first thing in that function (in all 26 releases of the era, one form);
//! - the startup check of the kvtuner flags, where the era validates server arguments:
//!   - from 0.5.20: `handle_hicache_ratio_default` in `arg_groups/hicache_hook.py`, which
//!     runs on the resolved arguments during resolution, right after it takes its view of them
//!     (`cfg = resolving_view(server_args)`);
//!   - 0.5.3 - 0.5.19: first thing in `ServerArgs.check_server_args`, which the engine calls
//!     at startup on the resolved arguments before any model load (0.5.19 also has the hook
//!     above, 0.5.17 - 0.5.18 only `ServerArgs` methods, so the one site all share).

use crate::era::Era;
use crate::patch::{BodyAt, ClassRef, FnRef, Group, Patch, PatchKind, Snippet};

pub const ID: &str = "hostpool";

/// Asked first: the quantizing pool class with the flag on, else `None` and the stock choice
/// below runs untouched.
const SELECT: &str = concat!(
    "from ",
    kvtuner_package!(module),
    ".selection import select_mha_host_pool_cls
",
    "
_kvtuner_cls = select_mha_host_pool_cls({first_param}, None)
if _kvtuner_cls is not None:
    return _kvtuner_cls
"
);

const CHECK: &str = concat!(
    "from ",
    kvtuner_package!(module),
    ".config import check_server_args
",
    "
check_server_args(cfg)
"
);

/// The same check as the first statements of `ServerArgs.check_server_args(self)`; imported
/// under another name so the method's own name is not shadowed in its body.
const CHECK_METHOD: &str = concat!(
    "from ",
    kvtuner_package!(module),
    ".config import (
    check_server_args as _kvtuner_check_server_args,
)

_kvtuner_check_server_args({first_param})
"
);

/// 0.5.3 - 0.5.13.post1: the class choice inside the stock class (see the module docs). Only
/// the stock class itself is redirected (the quantizing subclass is built as it is asked).
const NEW: &str = concat!(
    "
def __new__(cls, *args, **kwargs):
    chosen = cls
    if cls is MHATokenToKVPoolHost:
        from ",
    kvtuner_package!(module),
    ".selection import (
            select_mha_host_pool_cls,
        )

        device_pool = args[0] if args else kwargs.get(\"device_pool\")
        chosen = select_mha_host_pool_cls(device_pool, None) or cls
    return super().__new__(chosen)
"
);

/// Every era: the MLA host pool class chooses itself, as the oldest era's MHA class does (MLA
/// call sites name the class in every release, and `build_kv_host_pool` hard-codes it in
/// 0.5.23). The selection reads the stock `__init__`'s arguments, whatever their form.
const NEW_MLA: &str = concat!(
    "
def __new__(cls, *args, **kwargs):
    chosen = cls
    if cls is MLATokenToKVPoolHost:
        from ",
    kvtuner_package!(module),
    ".selection import (
            select_mla_host_pool_cls,
        )

        chosen = select_mla_host_pool_cls(args, kwargs) or cls
    return super().__new__(chosen)
"
);

const PUBLISH: &str = concat!(
    "from ",
    kvtuner_package!(module),
    ".config import publish_server_args
",
    "
publish_server_args({first_param})
"
);

/// The group's form for `era` (every era has one).
pub fn group(era: Era) -> Option<Group> {
    let select = match era {
        Era::DataclassAddArgument => Patch {
            id: "select-host-pool",
            what:
                "MHATokenToKVPoolHost(...) builds the quantizing pool with --enable-kvtuner-hicache",
            kind: PatchKind::ClassBody {
                class: ClassRef {
                    name: "MHATokenToKVPoolHost",
                    under: "sglang/srt/mem_cache",
                },
                at: BodyAt::AfterMethod("__init__"),
                block: Snippet::Text(NEW),
                needs: &[],
            },
        },
        Era::AnnotatedServerArgs | Era::NamespacedServerArgs | Era::MemoryStruct => Patch {
            id: "select-host-pool",
            what: "get_mha_host_pool_cls returns the quantizing pool with --enable-kvtuner-hicache",
            kind: PatchKind::FunctionStart {
                function: FnRef::ModuleUnder {
                    under: "sglang/srt/mem_cache",
                    name: "get_mha_host_pool_cls",
                },
                block: Snippet::Text(SELECT),
            },
        },
    };
    let check = match era {
        Era::MemoryStruct => Patch {
            id: "check-server-args",
            what: "startup check of the kvtuner flags in handle_hicache_ratio_default",
            kind: PatchKind::AfterAssign {
                // `arg_groups/hicache_hook.py` from 0.5.19; found by name, so a move
                // to another module is no new form.
                function: FnRef::ModuleUnder {
                    under: "sglang/srt",
                    name: "handle_hicache_ratio_default",
                },
                target: "cfg",
                block: Snippet::Text(CHECK),
            },
        },
        Era::NamespacedServerArgs | Era::AnnotatedServerArgs | Era::DataclassAddArgument => Patch {
            id: "check-server-args",
            what: "startup check of the kvtuner flags in ServerArgs.check_server_args",
            kind: PatchKind::FunctionStart {
                function: FnRef::Method {
                    class: ClassRef {
                        name: "ServerArgs",
                        under: "sglang/srt",
                    },
                    name: "check_server_args",
                },
                block: Snippet::Text(CHECK_METHOD),
            },
        },
    };
    let mut patches = vec![
        package_module!("package-init", "__init__.py"),
        package_module!("package-config", "config.py"),
        package_module!("package-server-args-fields", "server_args_fields.py"),
        package_module!("package-codec", "codec.py"),
        package_module!("package-device-codec", "device_codec.py"),
        package_module!("package-device-transfer", "device_transfer.py"),
        package_module!("package-page-format", "page_format.py"),
        package_module!("package-compat", "compat.py"),
        package_module!("package-overlay", "overlay.py"),
        package_module!("package-quantized-rows", "quantized_rows.py"),
        package_module!("package-host-pool", "host_pool.py"),
        package_module!("package-mla-pool", "mla_pool.py"),
        package_module!("package-selection", "selection.py"),
        package_module!("package-kv-model", "kv_model.py"),
        package_module!("package-evaluate", "evaluate.py"),
        package_module!("package-roundtrip", "roundtrip.py"),
        package_module!("package-calibrate", "calibrate.py"),
        select,
        Patch {
            id: "select-mla-host-pool",
            what: "MLATokenToKVPoolHost(...) builds the quantizing MLA pool with --enable-kvtuner-hicache",
            kind: PatchKind::ClassBody {
                class: ClassRef {
                    name: "MLATokenToKVPoolHost",
                    under: "sglang/srt/mem_cache",
                },
                at: BodyAt::AfterMethod("__init__"),
                block: Snippet::Text(NEW_MLA),
                needs: &[],
            },
        },
        check,
    ];
    // Only the oldest era needs the server args handed over (see the module docs).
    let publish = match era {
        Era::DataclassAddArgument => Some(Patch {
            id: "publish-server-args",
            what: "run_scheduler_process hands its server_args to kvtuner_hicache",
            kind: PatchKind::FunctionStart {
                // `managers/scheduler.py` in every release of the era.
                function: FnRef::ModuleUnder {
                    under: "sglang/srt",
                    name: "run_scheduler_process",
                },
                block: Snippet::Text(PUBLISH),
            },
        }),
        Era::AnnotatedServerArgs | Era::NamespacedServerArgs | Era::MemoryStruct => None,
    };
    patches.extend(publish);
    Some(Group {
        id: ID,
        summary: concat!(
            "quantizing HiCache host pool (",
            kvtuner_package!(module),
            ")"
        ),
        patches,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every module of the package is injected except the `juicefs` group's backend, so a
    /// module added to `patches/kvtuner_hicache/` cannot be forgotten here.
    #[test]
    fn injects_every_package_module_but_the_backend() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("patches/kvtuner_hicache");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".py"))
            .collect();
        on_disk.sort();
        let mut injected: Vec<String> = group(Era::newest())
            .unwrap()
            .patches
            .iter()
            .filter_map(|p| match p.kind {
                PatchKind::InjectFile { dest, .. } => {
                    assert!(
                        dest.starts_with(&format!("{}/", super::super::PACKAGE_DIR)),
                        "{dest}"
                    );
                    Some(dest.rsplit('/').next().unwrap().to_string())
                }
                _ => None,
            })
            .collect();
        injected.sort();
        assert_eq!(injected, on_disk);
    }
}
