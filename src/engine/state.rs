//! Whether a patch is in the tree ([`PatchState`]), and why not when the tree is not what the
//! patch expects ([`DriftReason`]): the code signal of a located patch combined with the
//! marker signal of its file.

use crate::engine::marker;
use crate::refusal::Drift;
use serde::Serialize;
use std::fmt;

/// Whether one patch is in the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum PatchState {
    Applied,
    NotApplied,
    Drifted(DriftReason),
}

/// Why a patch counts as drifted: the tree is not what the patch expects. Kept typed up to
/// the report and the exit code; shown (and serialised) as one line naming the patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriftReason {
    /// An anchor did not match exactly once (the patch cannot be placed or checked).
    AnchorNotFound(Drift),
    /// The begin/end markers in the file do not pair up.
    BrokenMarkers { rel: String, error: String },
    /// A marked block whose content no longer matches its marker hash.
    BlockEdited { tag: String, at: Vec<String> },
    /// The injected code is there without markers.
    CodeWithoutMarkers { tag: String, rel: String },
    /// Markers without the injected code.
    MarkersWithoutCode { tag: String, rel: String },
    /// Some, not all, of the injected definitions.
    Partial {
        tag: String,
        rel: String,
        present: usize,
        total: usize,
    },
    /// An injected file whose content no longer matches its header hash.
    InjectedFileEdited { tag: String, rel: String },
    /// A file where one would be injected, not written by kvtuner-patch.
    ForeignFile { tag: String, rel: String },
    /// This patch is missing while other patches of its group are there.
    MissingFromGroup { tag: String, rel: String },
}

impl DriftReason {
    /// Whether the anchor itself was found (every reason but [`DriftReason::AnchorNotFound`]).
    pub fn anchor_found(&self) -> bool {
        !matches!(self, DriftReason::AnchorNotFound(_))
    }
}

impl fmt::Display for DriftReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriftReason::AnchorNotFound(d) => write!(f, "{d}"),
            DriftReason::BrokenMarkers { rel, error } => write!(f, "{rel}: broken markers: {error}"),
            DriftReason::BlockEdited { tag, at } => write!(
                f,
                "{tag}: injected block edited by hand (content hash differs from its marker) at {}",
                at.join(", ")
            ),
            DriftReason::CodeWithoutMarkers { tag, rel } => write!(
                f,
                "{tag}: {rel}: the code is present but without kvtuner-patch markers (added by hand, or upstream now has it)"
            ),
            DriftReason::MarkersWithoutCode { tag, rel } => write!(
                f,
                "{tag}: {rel}: markers present but the injected code is missing"
            ),
            DriftReason::Partial {
                tag,
                rel,
                present,
                total,
            } => write!(
                f,
                "{tag}: {rel}: only {present} of {total} injected definitions present"
            ),
            DriftReason::InjectedFileEdited { tag, rel } => write!(
                f,
                "{tag}: {rel}: injected file edited by hand (hash differs from its header)"
            ),
            DriftReason::ForeignFile { tag, rel } => write!(
                f,
                "{tag}: {rel}: exists but was not written by kvtuner-patch"
            ),
            DriftReason::MissingFromGroup { tag, rel } => write!(
                f,
                "{tag}: {rel}: not applied, but other patches of the group are"
            ),
        }
    }
}

/// Serialised as the line it prints (the JSON report's `detail`).
impl Serialize for DriftReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Combine the code signal (how much of the injected code is there) with the marker signal.
pub fn combine(tag: &str, rel: &str, present: usize, total: usize, file_text: &str) -> PatchState {
    let blocks = match marker::find_blocks(file_text) {
        Ok(b) => b.into_iter().filter(|b| b.tag == tag).collect::<Vec<_>>(),
        Err(error) => {
            return PatchState::Drifted(DriftReason::BrokenMarkers {
                rel: rel.into(),
                error,
            })
        }
    };
    let edited: Vec<String> = blocks
        .iter()
        .filter(|b| !b.intact())
        .map(|b| format!("{rel}:{}", b.line))
        .collect();
    let (tag, rel) = (tag.to_string(), rel.to_string());
    let reason = match (present, blocks.is_empty()) {
        (0, true) => return PatchState::NotApplied,
        (p, false) if p == total && edited.is_empty() => return PatchState::Applied,
        (p, false) if p == total => DriftReason::BlockEdited { tag, at: edited },
        (p, true) if p == total => DriftReason::CodeWithoutMarkers { tag, rel },
        (0, false) => DriftReason::MarkersWithoutCode { tag, rel },
        (present, _) => DriftReason::Partial {
            tag,
            rel,
            present,
            total,
        },
    };
    PatchState::Drifted(reason)
}
