//! `hostpool`: the quantizing HiCache host pool, SGLang 0.5.20 - 0.5.23 (`memory-struct` era).
//!
//! - the package `patches/kvtuner_hicache/` (all but `juicefs_storage.py`, which is the
//!   `juicefs` group's) becomes `sglang.srt.mem_cache.kvtuner_hicache`;
//! - `get_mha_host_pool_cls` in `mem_cache/pool_host/mha.py`, the one place the release picks
//!   the dense MHA host pool class, first asks `select_mha_host_pool_cls`, which answers only
//!   with `--enable-kvtuner-hicache` (so without the flag SGLang builds its stock pool);
//! - `handle_hicache_ratio_default` in `arg_groups/hicache_hook.py`, which runs at startup on
//!   the resolved server arguments, checks the kvtuner flags right after it takes its view of
//!   them (`cfg = resolving_view(server_args)`), so bad combinations fail before any model load.

use crate::group::{FnRef, Group, Patch, PatchKind, Snippet};

pub const ID: &str = "hostpool";

/// Where the package is injected (the `juicefs` group puts its backend here too).
pub const PACKAGE_DIR: &str = "sglang/srt/mem_cache/kvtuner_hicache";

/// One injected module of `patches/kvtuner_hicache/`, embedded at build time.
macro_rules! module {
    ($id:literal, $file:literal) => {
        Patch {
            id: $id,
            what: concat!("inject kvtuner_hicache/", $file),
            kind: PatchKind::InjectFile {
                dest: concat!("sglang/srt/mem_cache/kvtuner_hicache/", $file),
                source: include_str!(concat!("../../patches/kvtuner_hicache/", $file)),
            },
        }
    };
}

/// Asked first: the quantizing pool class with the flag on, else `None` and the stock choice
/// below runs untouched.
const SELECT: &str = "
from sglang.srt.mem_cache.kvtuner_hicache.selection import select_mha_host_pool_cls

_kvtuner_cls = select_mha_host_pool_cls({first_param}, None)
if _kvtuner_cls is not None:
    return _kvtuner_cls
";

const CHECK: &str = "
from sglang.srt.mem_cache.kvtuner_hicache.config import check_server_args

check_server_args(cfg)
";

pub fn group() -> Group {
    Group {
        id: ID,
        summary: "quantizing HiCache host pool (sglang.srt.mem_cache.kvtuner_hicache)",
        patches: vec![
            module!("package-init", "__init__.py"),
            module!("package-config", "config.py"),
            module!("package-page-format", "page_format.py"),
            module!("package-host-pool", "host_pool.py"),
            module!("package-selection", "selection.py"),
            Patch {
                id: "select-host-pool",
                what: "get_mha_host_pool_cls returns the quantizing pool with --enable-kvtuner-hicache",
                kind: PatchKind::FunctionStart {
                    function: FnRef::Module {
                        file: "sglang/srt/mem_cache/pool_host/mha.py",
                        name: "get_mha_host_pool_cls",
                    },
                    block: Snippet::Text(SELECT),
                },
            },
            Patch {
                id: "check-server-args",
                what: "startup check of the kvtuner flags in handle_hicache_ratio_default",
                kind: PatchKind::AfterAssign {
                    function: FnRef::Module {
                        file: "sglang/srt/arg_groups/hicache_hook.py",
                        name: "handle_hicache_ratio_default",
                    },
                    target: "cfg",
                    block: Snippet::Text(CHECK),
                },
            },
        ],
    }
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
            .filter(|n| n.ends_with(".py") && n != "juicefs_storage.py")
            .collect();
        on_disk.sort();
        let mut injected: Vec<String> = group()
            .patches
            .iter()
            .filter_map(|p| match p.kind {
                PatchKind::InjectFile { dest, .. } => {
                    assert!(dest.starts_with(&format!("{PACKAGE_DIR}/")), "{dest}");
                    Some(dest.rsplit('/').next().unwrap().to_string())
                }
                _ => None,
            })
            .collect();
        injected.sort();
        assert_eq!(injected, on_disk);
    }
}
