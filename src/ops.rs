//! The five commands as library functions: each returns a serialisable report and an exit
//! code, or an error (whose exit code `refusal::exit_code` gives). `main.rs` only parses
//! arguments and prints.

use crate::anchor::{self, PatchState, Planned};
use crate::group::{Group, PatchKind};
use crate::groups;
use crate::manifest::Manifest;
use crate::marker::{self, sha256};
use crate::plan::Plan;
use crate::python::Python;
use crate::refusal::{Refusal, EXIT_DRIFT, EXIT_ERROR, EXIT_OK};
use crate::sources::Sources;
use crate::syntax::PyFile;
use crate::tree::{Era, SglangTree, Support};
use anyhow::Result;
use serde::Serialize;
use std::fs;
use std::path::Path;

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
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    pub id: String,
    pub summary: String,
    pub state: GroupState,
    pub patches: Vec<PatchStatus>,
}

impl GroupStatus {
    pub fn problems(&self) -> Vec<String> {
        let some_applied = self.patches.iter().any(|p| p.state == PatchState::Applied);
        self.patches
            .iter()
            .filter_map(|p| match &p.state {
                PatchState::Drifted(d) => Some(d.clone()),
                // Part of a group missing while the rest is there (a block removed by hand).
                PatchState::NotApplied if some_applied => Some(format!(
                    "{}/{}: {}: not applied, but other patches of the group are",
                    self.id,
                    p.id,
                    p.file.as_deref().unwrap_or("?")
                )),
                _ => None,
            })
            .collect()
    }
}

/// Per-patch state; a not-applied patch whose anchors do not resolve counts as drifted.
fn group_status(src: &mut Sources, group: &Group) -> Result<GroupStatus> {
    let mut patches = Vec::new();
    for patch in &group.patches {
        let (state, file) = match anchor::detect(src, group, patch) {
            Ok((PatchState::NotApplied, file)) => match anchor::plan(src, group, patch) {
                Ok(_) => (PatchState::NotApplied, Some(file)),
                Err(e) if crate::refusal::exit_code(&e) == EXIT_DRIFT => {
                    (PatchState::Drifted(e.to_string()), Some(file))
                }
                Err(e) => return Err(e),
            },
            Ok((state, file)) => (state, Some(file)),
            Err(e) if crate::refusal::exit_code(&e) == EXIT_DRIFT => {
                (PatchState::Drifted(e.to_string()), None)
            }
            Err(e) => return Err(e),
        };
        patches.push(PatchStatus {
            id: patch.id.to_string(),
            what: patch.what.to_string(),
            file,
            state,
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
    tree.era.unwrap_or(Era::ALL[Era::ALL.len() - 1])
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

// ---------------------------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------------------------

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
                let detail = match &p.state {
                    PatchState::Drifted(d) => Some(d.clone()),
                    _ => None,
                };
                // A lookup that failed is a `Drift` ("looked for X: found N matches"); other
                // drift (a hand-edited block) means the anchor itself was found.
                let found = detail
                    .as_deref()
                    .is_none_or(|d| !d.contains(": looked for "));
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
            groups: statuses,
            anchors,
        },
        code,
    ))
}

// ---------------------------------------------------------------------------------------------
// apply / diff
// ---------------------------------------------------------------------------------------------

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
}

/// Plan the selected groups; with `write`, commit the plan.
pub fn apply(root: &Path, only: &[String], python: &Python, write: bool) -> Result<ApplyReport> {
    let tree = SglangTree::resolve(root)?;
    let sel = selection(&tree, only)?;
    require_supported(&tree, &sel)?;
    let selected = sel.groups;
    let mut src = Sources::new(&tree);
    let mut planned: Vec<Planned> = Vec::new();
    let (mut applied, mut already, mut problems) = (Vec::new(), Vec::new(), Vec::new());
    for g in &selected {
        let st = group_status(&mut src, g)?;
        match st.state {
            GroupState::Applied => already.push(g.id.to_string()),
            GroupState::Drifted => problems.extend(st.problems()),
            GroupState::NotApplied => {
                for p in &g.patches {
                    planned.push(anchor::plan(&mut src, g, p)?);
                }
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
    let plan = Plan::build(planned, &mut src)?;
    plan.validate(python)?;
    if write && !plan.is_empty() {
        let ids: Vec<&str> = applied.iter().map(String::as_str).collect();
        plan.commit(&tree, &ids)?;
    }
    Ok(ApplyReport {
        dry_run: !write,
        applied,
        already_applied: already,
        files: plan.changes.iter().map(|c| c.rel.clone()).collect(),
        diff: plan.diff(&tree),
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

// ---------------------------------------------------------------------------------------------
// verify
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub struct FileCheck {
    pub file: String,
    pub parses: bool,
    pub compiles: bool,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ImportCheck {
    pub python: String,
    pub module: String,
    pub ok: bool,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub groups: Vec<GroupStatus>,
    pub files: Vec<FileCheck>,
    pub kvtuner_quant: Option<ImportCheck>,
    pub problems: Vec<String>,
    /// Things that are fine now but worth knowing (e.g. `revert` will need `--force`).
    pub notes: Vec<String>,
}

pub fn verify(
    root: &Path,
    only: &[String],
    python: &Python,
    check_import: bool,
) -> Result<(VerifyReport, i32)> {
    let tree = SglangTree::resolve(root)?;
    let sel = selection(&tree, only)?;
    require_supported(&tree, &sel)?;
    let selected = sel.groups;
    let mut src = Sources::new(&tree);
    let mut statuses = Vec::new();
    let mut problems = Vec::new();
    let mut touched: Vec<String> = Vec::new();
    for g in &selected {
        let st = group_status(&mut src, g)?;
        match st.state {
            GroupState::Applied => {}
            GroupState::NotApplied => problems.push(format!("group `{}` is not applied", g.id)),
            GroupState::Drifted => problems.extend(st.problems()),
        }
        for p in &st.patches {
            if let Some(f) = &p.file {
                if !touched.contains(f) {
                    touched.push(f.clone());
                }
            }
        }
        for p in &g.patches {
            if let PatchKind::InjectFile { dest, .. } = p.kind {
                if src.text(dest)?.is_none() {
                    problems.push(format!("{}: injected file {dest} is missing", g.tag(p)));
                }
            }
        }
        statuses.push(st);
    }
    // Every touched file: tree-sitter parse, then one CPython compile for all of them.
    let mut files = Vec::new();
    let mut texts: Vec<(String, String)> = Vec::new();
    for rel in &touched {
        let Some(text) = src.text(rel)? else { continue };
        let text = text.to_string();
        let err = PyFile::parse(rel.as_str(), text.clone())?.syntax_error();
        if let Some(e) = &err {
            problems.push(format!("{rel}: does not parse (tree-sitter): {e}"));
        }
        files.push(FileCheck {
            file: rel.clone(),
            parses: err.is_none(),
            compiles: true,
            error: err,
        });
        texts.push((rel.clone(), text));
    }
    let refs: Vec<(String, &str)> = texts.iter().map(|(r, t)| (r.clone(), t.as_str())).collect();
    for (rel, msg) in python.compile_failures(&refs)? {
        problems.push(format!("{rel}: does not compile: {msg}"));
        if let Some(f) = files.iter_mut().find(|f| f.file == rel) {
            f.compiles = false;
            f.error.get_or_insert(msg);
        }
    }
    let kvtuner_quant = if check_import {
        let r = python.check_import("kvtuner_quant")?;
        if let Err(e) = &r {
            problems.push(format!(
                "{} cannot import kvtuner_quant: {e}",
                python.exe.display()
            ));
        }
        Some(ImportCheck {
            python: python.exe.display().to_string(),
            module: "kvtuner_quant".into(),
            ok: r.is_ok(),
            error: r.err(),
        })
    } else {
        None
    };
    let mut notes = Vec::new();
    if let Some(m) = Manifest::load(&tree)? {
        for (rel, rec) in &m.files {
            let now = fs::read(tree.path(rel)).ok().map(|b| sha256(&b));
            if now.as_deref() != Some(rec.post_sha256.as_str()) {
                notes.push(format!(
                    "{rel} changed since apply; `revert` will refuse it without --force"
                ));
            }
        }
    }
    let ok = problems.is_empty();
    let code = if ok { EXIT_OK } else { EXIT_DRIFT };
    Ok((
        VerifyReport {
            ok,
            groups: statuses,
            files,
            kvtuner_quant,
            problems,
            notes,
        },
        code,
    ))
}

// ---------------------------------------------------------------------------------------------
// revert
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize, Default)]
pub struct RevertReport {
    /// Files given back their pre-apply bytes.
    pub restored: Vec<String>,
    /// Injected files (and folders) removed.
    pub removed: Vec<String>,
    /// Files edited since apply that `--force` overwrote anyway.
    pub forced: Vec<String>,
    /// Nothing was applied: nothing to do.
    pub nothing_to_do: bool,
    /// Reverted by stripping markers (no manifest; `--force`), not byte-exact by construction.
    pub from_markers: bool,
}

enum Action {
    Restore(String, Vec<u8>),
    Remove(String),
}

pub fn revert(root: &Path, force: bool) -> Result<RevertReport> {
    let tree = SglangTree::resolve(root)?;
    let Some(manifest) = Manifest::load(&tree)? else {
        return revert_without_manifest(&tree, force);
    };
    let mut report = RevertReport::default();
    let mut actions = Vec::new();
    let mut edited = Vec::new();
    for (rel, rec) in &manifest.files {
        let now = match fs::read(tree.path(rel)) {
            Ok(b) => Some(sha256(&b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        let untouched = now.as_deref() == Some(rec.post_sha256.as_str());
        if rec.created {
            if now.is_none() {
                continue;
            }
            if !untouched {
                edited.push(rel.clone());
            }
            actions.push(Action::Remove(rel.clone()));
        } else {
            if now.is_some() && now == rec.pre_sha256 {
                continue; // already the original (e.g. apply was interrupted before writing it)
            }
            if !untouched {
                edited.push(rel.clone());
            }
            actions.push(Action::Restore(rel.clone(), manifest.original(&tree, rel)?));
        }
    }
    if !edited.is_empty() && !force {
        return Err(Refusal::drifts(
            "refusing to revert: patched files were edited after apply (use --force to restore the originals anyway); nothing was changed",
            edited.iter().map(|f| format!("{f}: content differs from what apply wrote")).collect(),
        )
        .into());
    }
    report.forced = edited;
    for a in actions {
        match a {
            Action::Restore(rel, bytes) => {
                crate::manifest::write_atomic(&tree.path(&rel), &bytes, None)?;
                report.restored.push(rel);
            }
            Action::Remove(rel) => {
                fs::remove_file(tree.path(&rel))?;
                report.removed.push(rel);
            }
        }
    }
    for d in manifest.created_dirs.iter().rev() {
        // Only if empty: anything else put there is the user's.
        if fs::remove_dir(tree.path(d)).is_ok() {
            report.removed.push(format!("{d}/"));
        }
    }
    fs::remove_dir_all(Manifest::dir(&tree))?;
    Ok(report)
}

/// No manifest: without `--force` refuse if anything of ours is there; with it, strip our
/// marked blocks and injected files (edits outside markers, like an added comma, stay).
fn revert_without_manifest(tree: &SglangTree, force: bool) -> Result<RevertReport> {
    let mut src = Sources::new(tree);
    let mut files: Vec<String> = Vec::new();
    let mut injected: Vec<String> = Vec::new();
    for g in selection(tree, &[])?.groups {
        let st = group_status(&mut src, &g)?;
        if st.state == GroupState::NotApplied {
            continue;
        }
        for (p, ps) in g.patches.iter().zip(&st.patches) {
            match (p.kind, &ps.file) {
                (PatchKind::InjectFile { dest, .. }, _)
                    if src
                        .text(dest)?
                        .is_some_and(|t| marker::check_file_header(&g.tag(p), t).is_some()) =>
                {
                    injected.push(dest.to_string());
                }
                (PatchKind::InjectFile { .. }, _) => {}
                (_, Some(f)) if !files.contains(f) => files.push(f.clone()),
                _ => {}
            }
        }
    }
    if files.is_empty() && injected.is_empty() {
        return Ok(RevertReport {
            nothing_to_do: true,
            ..Default::default()
        });
    }
    if !force {
        return Err(Refusal::drifts(
            "refusing to revert: no manifest (sglang/.kvtuner-patch/manifest.json) in this tree, so a byte-exact revert is impossible; --force strips the marked blocks instead",
            files.iter().chain(&injected).map(|f| format!("{f}: carries kvtuner-patch changes")).collect(),
        )
        .into());
    }
    let mut report = RevertReport {
        from_markers: true,
        ..Default::default()
    };
    let mut writes = Vec::new();
    for rel in &files {
        let text = src.text(rel)?.expect("detected").to_string();
        let blocks = marker::find_blocks(&text).map_err(|e| anyhow::anyhow!("{rel}: {e}"))?;
        let mut out = String::new();
        let mut pos = 0;
        for b in blocks {
            out.push_str(&text[pos..b.range.start]);
            pos = b.range.end;
        }
        out.push_str(&text[pos..]);
        writes.push((rel.clone(), out));
    }
    for (rel, out) in writes {
        crate::manifest::write_atomic(&tree.path(&rel), out.as_bytes(), None)?;
        report.restored.push(rel);
    }
    let mut folders: Vec<String> = Vec::new();
    for rel in injected {
        fs::remove_file(tree.path(&rel))?;
        if let Some((dir, _)) = rel.rsplit_once('/') {
            if !folders.iter().any(|d| d == dir) {
                folders.push(dir.to_string());
            }
        }
        report.removed.push(rel);
    }
    // The folders apply created for injected files, when nothing else is left in them
    // (without a manifest this is the best guess; anything put there is the user's and stays),
    // a subfolder before the folder holding it.
    folders.sort_by(|a, b| b.cmp(a));
    for d in folders {
        if fs::remove_dir(tree.path(&d)).is_ok() {
            report.removed.push(format!("{d}/"));
        }
    }
    Ok(report)
}
