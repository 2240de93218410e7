//! `status`: per group applied / not applied / drifted, the release, its era and whether it
//! is supported, and every anchor looked up (report only; nothing is changed).

use super::{group_status, selection, support_of, GroupState, GroupStatus};
use crate::engine::anchor::PatchState;
use crate::engine::manifest::Manifest;
use crate::engine::sources::Sources;
use crate::journal;
use crate::refusal::{EXIT_DRIFT, EXIT_ERROR, EXIT_OK};
use crate::sglang_tree::{SglangTree, Support};
use anyhow::Result;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub tree: SglangTree,
    /// Whether the selected groups can be applied to this tree (release and groups).
    pub support: Support,
    /// Whether the release itself is supported (in the list, layout matching its era).
    pub release_support: Support,
    /// Selected groups that have no form for the tree's era (not looked up).
    pub unsupported_groups: Vec<UnsupportedGroup>,
    /// A manifest from an earlier `apply` is in the tree.
    pub manifest: bool,
    /// An `apply` or `revert` was interrupted: what happened and what the next run does.
    pub interrupted: Option<String>,
    pub groups: Vec<GroupStatus>,
    /// Every anchor of every group form for the tree's era, looked up report-only: for a
    /// release newer than the list this says at once what still matches and what moved.
    pub anchors: Vec<AnchorCheck>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UnsupportedGroup {
    pub id: String,
    pub reason: String,
}

/// One patch's anchor lookup.
#[derive(Debug, Clone, Serialize)]
pub struct AnchorCheck {
    /// `group/patch`.
    pub patch: String,
    pub found: bool,
    /// Package-relative file the anchor was found in.
    pub file: Option<String>,
    /// What was not found (or what else is wrong there).
    pub detail: Option<String>,
}

pub fn status(root: &Path, only: &[String]) -> Result<(StatusReport, i32)> {
    let tree = SglangTree::resolve(root)?;
    let sel = selection(&tree, only)?;
    let support = support_of(&tree, &sel);
    let mut src = Sources::new(&tree);
    let mut statuses = Vec::new();
    for g in &sel.groups {
        statuses.push(group_status(&mut src, g)?);
    }
    let anchors = statuses
        .iter()
        .flat_map(|g| {
            g.patches.iter().map(move |p| {
                // Drift other than a failed lookup (a hand-edited block) means the anchor
                // itself was found.
                let (found, detail) = match &p.state {
                    PatchState::Drifted(d) => (d.anchor_found(), Some(d.to_string())),
                    _ => (true, None),
                };
                AnchorCheck {
                    patch: format!("{}/{}", g.id, p.id),
                    found,
                    file: p.file.clone(),
                    detail,
                }
            })
        })
        .collect();
    let code = if !support.supported {
        EXIT_ERROR
    } else if statuses.iter().all(|g| g.state == GroupState::Applied) {
        EXIT_OK
    } else {
        EXIT_DRIFT
    };
    let manifest = Manifest::path(&tree).exists();
    let interrupted = journal::interrupted(&tree.parent).map(|i| i.describe());
    let code = if interrupted.is_some() && code == EXIT_OK {
        EXIT_DRIFT
    } else {
        code
    };
    Ok((
        StatusReport {
            tree: tree.clone(),
            support,
            release_support: tree.support(),
            unsupported_groups: sel
                .unsupported
                .iter()
                .map(|(id, reason)| UnsupportedGroup {
                    id: id.clone(),
                    reason: reason.clone(),
                })
                .collect(),
            manifest,
            interrupted,
            groups: statuses,
            anchors,
        },
        code,
    ))
}
