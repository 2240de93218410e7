//! The commands, one module each: each returns a [`Report`] (its exit code, its text and JSON
//! rendering), or an error (whose exit code and message `refusal::Failure` gives). `main.rs`
//! only parses arguments and prints. What they share: the selected groups in their form for the tree's era, and each
//! group's state from one lookup of every patch.

pub mod apply;
pub mod report;
pub mod revert;
pub mod status;
pub mod verify;

pub use apply::{apply, diff, ApplyReport, DiffReport};
pub use report::{Report, Text};
pub use revert::{revert, RevertReport};
pub use status::{status, StatusReport};
pub use verify::{verify, VerifyReport};

use crate::engine::anchor::{self, DriftReason, Lookup, PatchEdit, PatchState};
use crate::engine::sources::Sources;
use crate::era::Era;
use crate::groups;
use crate::journal::{self, Interrupted};
use crate::patch::Group;
use crate::refusal::Refusal;
use crate::sglang_tree::{SglangTree, Support};
use crate::tree_lock::{self, TreeLock};
use anyhow::Result;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupState {
    Applied,
    NotApplied,
    Drifted,
}

#[derive(Debug, Clone, Serialize)]
pub struct PatchStatus {
    pub id: String,
    pub what: String,
    /// Package-relative file the patch lives in (when its anchor was found).
    pub file: Option<String>,
    #[serde(flatten)]
    pub state: PatchState,
    /// What applying the patch would change, from the same lookup as `state` (`None` when an
    /// anchor was not found).
    #[serde(skip)]
    pub edit: Option<PatchEdit>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    pub id: String,
    pub summary: String,
    pub state: GroupState,
    pub patches: Vec<PatchStatus>,
}

impl GroupStatus {
    /// Why the group is drifted: each drifted patch, and each patch missing while others of
    /// the group are there (a block removed by hand).
    pub fn drift_reasons(&self) -> Vec<DriftReason> {
        let some_applied = self.patches.iter().any(|p| p.state == PatchState::Applied);
        self.patches
            .iter()
            .filter_map(|p| match &p.state {
                PatchState::Drifted(d) => Some(d.clone()),
                PatchState::NotApplied if some_applied => Some(DriftReason::MissingFromGroup {
                    tag: format!("{}/{}", self.id, p.id),
                    rel: p.file.clone().unwrap_or_else(|| "?".into()),
                }),
                _ => None,
            })
            .collect()
    }

    /// [`GroupStatus::drift_reasons`] as lines.
    pub fn problems(&self) -> Vec<String> {
        self.drift_reasons().iter().map(|d| d.to_string()).collect()
    }
}

/// Every patch of `group` looked up once: its state, file and edits. An anchor not found
/// makes the patch drifted (the drift names where it was looked for).
fn group_status(src: &mut Sources, group: &Group) -> Result<GroupStatus> {
    let mut patches = Vec::new();
    for patch in &group.patches {
        let (state, file, edit) = match anchor::locate(src, group, patch)? {
            Lookup::Found(l) => (l.state, Some(l.rel), Some(l.edit)),
            Lookup::NotFound(d) => (
                PatchState::Drifted(DriftReason::AnchorNotFound(d)),
                None,
                None,
            ),
        };
        patches.push(PatchStatus {
            id: patch.id.to_string(),
            what: patch.what.to_string(),
            file,
            state,
            edit,
        });
    }
    let all = |s: &PatchState| patches.iter().all(|p| &p.state == s);
    let state = if all(&PatchState::Applied) {
        GroupState::Applied
    } else if all(&PatchState::NotApplied) {
        GroupState::NotApplied
    } else {
        GroupState::Drifted
    };
    Ok(GroupStatus {
        id: group.id.to_string(),
        summary: group.summary.to_string(),
        state,
        patches,
    })
}

/// The era whose group forms apply to `tree`: its own, or for a layout nobody recognised the
/// newest one (so `status` can still say which anchors a new release kept).
fn era_of(tree: &SglangTree) -> Era {
    tree.era.unwrap_or_else(Era::newest)
}

/// The selected groups in their form for the tree's era.
fn selection(tree: &SglangTree, only: &[String]) -> Result<groups::Selection> {
    groups::select(only, era_of(tree))
}

/// Whether the tree is a supported release *and* every selected group can patch its era.
fn support_of(tree: &SglangTree, sel: &groups::Selection) -> Support {
    let s = tree.support();
    if !s.supported || sel.unsupported.is_empty() {
        return s;
    }
    let why: Vec<&str> = sel.unsupported.iter().map(|(_, r)| r.as_str()).collect();
    Support {
        supported: false,
        reason: format!(
            "{}; but {} (`--only` can select the others)",
            s.reason,
            why.join("; ")
        ),
    }
}

fn require_supported(tree: &SglangTree, sel: &groups::Selection) -> Result<()> {
    let s = support_of(tree, sel);
    if s.supported {
        Ok(())
    } else {
        Err(Refusal::error(
            format!(
                "{}: unsupported SGLang tree: {}; nothing was changed",
                tree.root.display(),
                s.reason
            ),
            vec![],
        )
        .into())
    }
}

/// What `apply` and `revert` do first: take the tree lock (exit 2 naming the holder if another
/// run has it), then roll back an operation a crash interrupted ([`journal::recover`]).
fn lock_and_recover(tree: &SglangTree) -> Result<(TreeLock, Option<Interrupted>)> {
    let lock = tree_lock::lock(&tree.path("sglang")).map_err(|m| Refusal::error(m, Vec::new()))?;
    let recovered = journal::recover(&tree.parent)?;
    Ok((lock, recovered))
}

/// Read-only commands that need a settled tree (`diff`, `apply --dry-run`) refuse one an
/// interrupted operation left half-changed.
fn require_settled(tree: &SglangTree) -> Result<()> {
    match journal::interrupted(&tree.parent) {
        Some(i) if i.changed_tree => Err(Refusal::error(
            format!("{}; run apply or revert to recover first", i.describe()),
            Vec::new(),
        )
        .into()),
        _ => Ok(()),
    }
}

/// Every file any group (in its form for the tree's era) edits or injects: what a manifest
/// may name. `apply` drops other entries instead of carrying them forward.
fn known_files(src: &mut Sources, tree: &SglangTree) -> Result<std::collections::BTreeSet<String>> {
    let mut known = std::collections::BTreeSet::new();
    for g in selection(tree, &[])?.groups {
        for p in &g.patches {
            if let crate::patch::PatchKind::InjectFile { dest, .. } = p.kind {
                known.insert(dest.to_string());
            }
        }
        // A group whose anchors cannot be looked up here (its folders absent) names no file.
        if let Ok(st) = group_status(src, &g) {
            known.extend(st.patches.into_iter().filter_map(|p| p.file));
        }
    }
    Ok(known)
}
