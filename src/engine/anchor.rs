//! Anchors: a [`Patch`] looked up once on a concrete tree ([`locate`]); from that one lookup
//! both whether it is already there ([`PatchState`]) and the edits that would apply it
//! ([`PatchEdit`]).
//!
//! The jobs behind it each have a room: `resolve` finds what an anchor names (exactly once,
//! or [`Drift`]), `plan` plans each patch kind, `snippet` renders the text it inserts, and
//! `state` combines the code and marker signals into a state.

pub use crate::engine::edit::PatchEdit;
pub use crate::engine::state::{DriftReason, PatchState};
pub use crate::refusal::Drift;

use crate::engine::plan::{self, Code};
use crate::engine::sources::Sources;
use crate::engine::state;
use crate::patch::{Group, Patch};
use anyhow::Result;

/// A patch's anchor resolved once on the tree as it is now; its state and its edits both
/// come from that one lookup, so detection and planning cannot disagree.
#[derive(Debug, Clone)]
pub struct Located {
    /// Package-relative file the patch lives in.
    pub rel: String,
    pub state: PatchState,
    /// What applying the patch to the tree as it is now would change (meaningful when the
    /// state is [`PatchState::NotApplied`]).
    pub edit: PatchEdit,
}

/// The outcome of looking a patch up: located, or an anchor that did not match exactly once.
#[derive(Debug, Clone)]
pub enum Lookup {
    Found(Located),
    NotFound(Drift),
}

impl Lookup {
    /// The located patch, or the drift as an error (for callers to whom drift is a failure).
    pub fn found(self) -> Result<Located> {
        match self {
            Lookup::Found(l) => Ok(l),
            Lookup::NotFound(d) => Err(d.into()),
        }
    }
}

/// Look `patch` up on the tree as it is now. An anchor that does not match exactly once is
/// [`Lookup::NotFound`]; an error is anything else (I/O, an embedded snippet that does not
/// parse, an anchor shape the engine cannot edit).
pub fn locate(src: &mut Sources, group: &Group, patch: &Patch) -> Result<Lookup> {
    let tag = group.tag(patch);
    match plan::plan(src, &tag, patch) {
        Ok(planned) => {
            let rel = planned.rel;
            let state = match planned.code {
                Code::File(state) => state,
                Code::Present { present, total } => {
                    let text = src.text(&rel)?.expect("resolved files exist");
                    state::combine(&tag, &rel, present, total, text)
                }
            };
            Ok(Lookup::Found(Located {
                rel,
                state,
                edit: planned.edit,
            }))
        }
        Err(e) => e.downcast::<Drift>().map(Lookup::NotFound),
    }
}
