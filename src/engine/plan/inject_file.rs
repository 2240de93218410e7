//! [`PatchKind::InjectFile`](crate::patch::PatchKind::InjectFile): a new file holding `source`
//! under a header line that carries its hash.

use super::{Code, Planned};
use crate::engine::edit::PatchEdit;
use crate::engine::marker;
use crate::engine::sources::Sources;
use crate::engine::state::{DriftReason, PatchState};
use anyhow::Result;

pub fn plan(src: &mut Sources, tag: &str, dest: &str, source: &str) -> Result<Planned> {
    let state = match src.text(dest)? {
        None => PatchState::NotApplied,
        Some(text) => match marker::check_file_header(tag, text) {
            Some(true) => PatchState::Applied,
            Some(false) => PatchState::Drifted(DriftReason::InjectedFileEdited {
                tag: tag.into(),
                rel: dest.into(),
            }),
            None => PatchState::Drifted(DriftReason::ForeignFile {
                tag: tag.into(),
                rel: dest.into(),
            }),
        },
    };
    let edit = PatchEdit::Create {
        rel: dest.to_string(),
        text: format!("{}{source}", marker::file_header(tag, source)),
    };
    Ok(Planned {
        rel: dest.to_string(),
        code: Code::File(state),
        edit,
    })
}
