//! The patch engine, generic over [`PatchKind`](crate::patch::PatchKind): groups carry no logic.
//!
//! - [`anchor`]: a patch's anchor resolved once on a concrete tree; from that one result, the
//!   patch's state (applied / not applied / drifted) and its edits.
//! - [`resolve`]: the class, file, function or list an anchor names, exactly once or drift.
//! - [`plan`]: one planning function per patch kind: file, code signal and edits.
//! - [`snippet`]: the text a patch inserts, rendered and dedented.
//! - [`state`]: a patch's state from its code signal and its file's markers.
//! - [`changeset`]: all-or-nothing: the edits of every patch per file, validated (tree-sitter +
//!   CPython), then committed through the one write path `apply` and `revert` share.
//! - [`declarations`]: the flag declarations of a patch file, rendered in older eras' syntax.
//! - [`syntax`]: tree-sitter parsing and structural queries (classes, fields, calls, lists, if/elif).
//! - [`edit`]: byte-range edits and the one function applying them (overlap = error).
//! - [`marker`]: begin/end marker comments and their content hashes.
//! - [`sources`]: read-once cache of the tree's files.
//! - [`manifest`]: what apply changed, for byte-exact revert.
//! - [`python`]: the CPython compile and import checks.
//! - [`diff`]: git-style unified diffs.

pub mod anchor;
pub mod changeset;
pub mod declarations;
pub mod diff;
pub mod edit;
pub mod manifest;
pub mod marker;
pub mod plan;
pub mod python;
pub mod resolve;
pub mod snippet;
pub mod sources;
pub mod state;
pub mod syntax;
