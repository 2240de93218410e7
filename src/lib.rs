//! kvtuner-patch: a structural patch engine that adds KVTuner quantized HiCache support to an
//! SGLang tree, and can verify and revert it.
//!
//! Module map (one concept each):
//! - [`edit`]: byte-range edits and the one function applying them (overlap = error).
//! - [`syntax`]: tree-sitter parsing and structural queries (classes, fields, calls, lists, if/elif).
//! - [`anchor`]: patches -> edits on a concrete tree; applied/not-applied/drift detection.
//! - [`group`]: patch groups as plain data; [`groups`]: the registry (`kvtuner`, ...).
//! - [`marker`]: begin/end marker comments and content hashes.
//! - [`tree`]: finding `sglang/` under `--sglang-root`, release and era, support.
//! - [`sources`]: read-once cache of the tree's files.
//! - [`plan`]: all-or-nothing: build, validate (tree-sitter + CPython), write atomically.
//! - [`manifest`]: what apply changed, for byte-exact revert.
//! - [`python`]: the CPython compile and import checks.
//! - [`diff`]: git-style unified diffs.
//! - [`refusal`]: errors carrying exit codes.
//! - [`ops`]: the commands (status, apply, diff, verify, revert).

pub mod anchor;
pub mod diff;
pub mod edit;
pub mod group;
pub mod groups;
pub mod journal;
pub mod manifest;
pub mod marker;
pub mod ops;
pub mod plan;
pub mod python;
pub mod refusal;
pub mod safe_path;
pub mod source_file;
pub mod sources;
pub mod syntax;
pub mod tree;
pub mod tree_lock;
