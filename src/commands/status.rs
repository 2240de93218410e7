//! `status`: per group applied / not applied / drifted, the release, its era and whether it
//! is supported, and every anchor looked up (report only; nothing is changed).

use super::{group_status, selection, support_of, GroupState, GroupStatus, Report, Text};
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
    /// 0 when every group is applied, 1 when not (or an operation was interrupted), 2 when
    /// the tree is not supported.
    #[serde(skip)]
    pub exit_code: i32,
}

impl Report for StatusReport {
    fn exit_code(&self) -> i32 {
        self.exit_code
    }

    fn render(&self, text: &mut Text) {
        let tree = &self.tree;
        text.line(format!("SGLang tree: {}", tree.parent.display()));
        text.line(format!(
            "release:     {}{}",
            tree.version.as_deref().unwrap_or("unknown"),
            tree.version_source
                .as_deref()
                .map(|s| format!(" (from {s})"))
                .unwrap_or_default()
        ));
        text.line(format!(
            "era:         {}",
            tree.era
                .map(|e| e.describe())
                .unwrap_or_else(|| "not recognised".into())
        ));
        text.line(format!(
            "supported:   {} - {}",
            if self.support.supported { "yes" } else { "NO" },
            self.support.reason
        ));
        if let Some(i) = &self.interrupted {
            text.line(format!("interrupted: {i}"));
        }
        text.line("groups:");
        text.groups(&self.groups);
        text.line("anchors (looked up, nothing changed):");
        for a in &self.anchors {
            let label = if a.found { "found    " } else { "NOT FOUND" };
            let what = a.detail.as_deref().or(a.file.as_deref()).unwrap_or("");
            text.line(format!("  {label} {:<32} {what}", a.patch));
        }
    }
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

pub fn status(root: &Path, only: &[String]) -> Result<StatusReport> {
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
    let exit_code = if interrupted.is_some() && code == EXIT_OK {
        EXIT_DRIFT
    } else {
        code
    };
    Ok(StatusReport {
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
        exit_code,
    })
}
