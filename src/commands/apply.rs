//! `apply` and `diff`: every selected group that is not applied yet, planned in memory as one
//! change set, validated (tree-sitter + CPython), and (for `apply`) committed.

use super::{
    era_of, group_status, known_files, lock_and_recover, require_settled, require_supported,
    selection, GroupState, Report, Text,
};
use crate::engine::changeset::ChangeSet;
use crate::engine::edit::PatchEdit;
use crate::engine::manifest::Manifest;
use crate::engine::python::Python;
use crate::engine::sources::Sources;
use crate::groups;
use crate::refusal::{Refusal, EXIT_DRIFT, EXIT_OK};
use crate::sglang_tree::SglangTree;
use anyhow::Result;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct ApplyReport {
    pub dry_run: bool,
    /// Groups this run applied (or would apply, with `--dry-run`).
    pub applied: Vec<String>,
    /// Groups that were already applied and left alone.
    pub already_applied: Vec<String>,
    /// Package-relative files written (or that would be).
    pub files: Vec<String>,
    /// Unified diff of the change (paths relative to `--sglang-root`).
    pub diff: String,
    /// An interrupted operation this run rolled back before its own work.
    pub recovered: Option<String>,
}

impl Report for ApplyReport {
    fn exit_code(&self) -> i32 {
        EXIT_OK
    }

    fn render(&self, text: &mut Text) {
        if self.dry_run && self.applied.is_empty() {
            text.remark(format!(
                "dry run: nothing to do, already applied [{}]",
                self.already_applied.join(", ")
            ));
        } else if self.dry_run {
            text.raw(&self.diff);
            text.remark(format!(
                "dry run: would apply [{}] to {} file(s); nothing written",
                self.applied.join(", "),
                self.files.len()
            ));
        } else if self.applied.is_empty() {
            text.line(format!(
                "nothing to do: already applied [{}]",
                self.already_applied.join(", ")
            ));
        } else {
            text.line(format!(
                "applied [{}]: {}",
                self.applied.join(", "),
                self.files.join(", ")
            ));
            if !self.already_applied.is_empty() {
                text.line(format!(
                    "already applied: [{}]",
                    self.already_applied.join(", ")
                ));
            }
        }
    }

    fn recovered(&self) -> Option<&str> {
        self.recovered.as_deref()
    }
}

/// `diff`: the report of an `apply` that writes nothing, whose exit code says whether there
/// is a difference (1) or none (0).
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct DiffReport(pub ApplyReport);

/// The unified diff `apply` would make on the selected groups.
pub fn diff(root: &Path, only: &[String], python: &Python) -> Result<DiffReport> {
    apply(root, only, python, false).map(DiffReport)
}

impl Report for DiffReport {
    fn exit_code(&self) -> i32 {
        if self.0.diff.is_empty() {
            EXIT_OK
        } else {
            EXIT_DRIFT
        }
    }

    fn render(&self, text: &mut Text) {
        text.raw(&self.0.diff);
    }
}

/// Build the change set of the selected groups; with `write`, commit it (`diff` and `--dry-run`
/// stop before that).
pub fn apply(root: &Path, only: &[String], python: &Python, write: bool) -> Result<ApplyReport> {
    let tree = SglangTree::resolve(root)?;
    let sel = selection(&tree, only)?;
    require_supported(&tree, &sel)?;
    // Held until the report is built: one writer at a time.
    let (_lock, recovered) = if write {
        let (lock, recovered) = lock_and_recover(&tree)?;
        (Some(lock), recovered)
    } else {
        require_settled(&tree)?;
        (None, None)
    };
    // Refuses (exit 2) a manifest naming paths this tool never writes, before any planning.
    Manifest::load(&tree)?;
    let selected = sel.groups;
    let mut src = Sources::new(&tree);
    let mut edits: Vec<PatchEdit> = Vec::new();
    let (mut applied, mut already, mut problems) = (Vec::new(), Vec::new(), Vec::new());
    for g in &selected {
        let st = group_status(&mut src, g)?;
        match st.state {
            GroupState::Applied => already.push(g.id.to_string()),
            GroupState::Drifted => problems.extend(st.problems()),
            GroupState::NotApplied => {
                // Every patch was found (else the group would be drifted): its edits come
                // from the same lookup that found it not applied.
                edits.extend(st.patches.into_iter().filter_map(|p| p.edit));
                applied.push(g.id.to_string());
            }
        }
    }
    if !problems.is_empty() {
        return Err(Refusal::drifts(
            "refusing to apply: the tree is not what the patches expect; nothing was changed",
            problems,
        )
        .into());
    }
    let missing = missing_requirements(&tree, &mut src, &applied, &already)?;
    if !missing.is_empty() {
        return Err(Refusal::error(
            "refusing to apply: a selected group needs another group that is neither applied to this tree nor selected; nothing was changed",
            missing,
        )
        .into());
    }
    let changes = ChangeSet::build(edits, &mut src)?;
    changes.validate(python)?;
    if write && !changes.is_empty() {
        let ids: Vec<&str> = applied.iter().map(String::as_str).collect();
        let known = known_files(&mut src, &tree)?;
        changes.commit(&tree, &ids, &known)?;
    }
    Ok(ApplyReport {
        dry_run: !write,
        applied,
        already_applied: already,
        files: changes.changes.iter().map(|c| c.rel.clone()).collect(),
        diff: changes.diff(&tree),
        recovered: recovered.map(|i| i.describe()),
    })
}

/// For each group about to be applied, the groups it requires (`groups::REGISTRY`) that are
/// neither selected in this run nor applied to the tree, as "what to do" lines.
fn missing_requirements(
    tree: &SglangTree,
    src: &mut Sources,
    applying: &[String],
    already: &[String],
) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for id in applying {
        for req in groups::requires(id) {
            if applying.iter().chain(already).any(|g| g == req) {
                continue;
            }
            let in_tree = match groups::select(&[req.to_string()], era_of(tree))?
                .groups
                .first()
            {
                Some(g) => group_status(src, g)?.state == GroupState::Applied,
                None => false,
            };
            if !in_tree {
                missing.push(format!(
                    "group `{id}` requires group `{req}`, which is not applied to this tree: \
                     apply both (`--only {req} --only {id}`, or no --only)"
                ));
            }
        }
    }
    Ok(missing)
}
