//! kvtuner-patch: a structural patch engine that adds KVTuner quantized HiCache support to an
//! SGLang tree, and can verify and revert it. `docs/patch-engine.md` has the map of files.
//!
//! - [`commands`]: one module per CLI command (status, apply/diff, verify, revert).
//! - [`groups`]: the patch groups as data (`kvtuner`, `hostpool`, `juicefs`), one form per era.
//! - [`patch`]: the vocabulary the groups are written in (patch kinds, anchors, snippets).
//! - [`era`]: the supported releases (`scripts/releases.txt`) and the table of layout eras.
//! - [`sglang_tree`]: finding `sglang/` under `--sglang-root`; its release, era and support.
//! - [`engine`]: resolving anchors, detecting, planning and committing edits.
//! - [`fsio`]: content hashes; [`journal`]: the crash-safe commit (undo journal, recovery);
//!   [`tree_lock`]: one writer at a time; [`safe_path`]: paths that stay in the tree;
//!   [`source_file`]: bounded reads of regular files, BOM and CRLF kept.
//! - [`refusal`]: the errors the CLI tells apart, and the one place errors become exit codes.

pub mod commands;
pub mod engine;
pub mod era;
pub mod fsio;
pub mod groups;
pub mod journal;
pub mod patch;
pub mod refusal;
pub mod safe_path;
pub mod sglang_tree;
pub mod source_file;
pub mod tree_lock;
