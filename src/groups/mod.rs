//! The registry of patch groups.
//!
//! To add a group (e.g. `hostpool`, `juicefs`): write its injected Python under
//! `patches/<group>/`, add `groups/<group>.rs` with a `pub fn group() -> Group` built from
//! the [`PatchKind`](crate::group::PatchKind)s it needs, and list it in [`all`]. The order of
//! [`all`] is the order groups are applied and reported in.

use crate::group::Group;

pub mod kvtuner;

/// Every group, in apply order.
pub fn all() -> Vec<Group> {
    vec![kvtuner::group()]
}

/// Groups selected by `--only` (all when `only` is empty), or an error naming the unknown id.
pub fn select(only: &[String]) -> anyhow::Result<Vec<Group>> {
    let all = all();
    if only.is_empty() {
        return Ok(all);
    }
    let known: Vec<&str> = all.iter().map(|g| g.id).collect();
    for id in only {
        if !known.contains(&id.as_str()) {
            anyhow::bail!("unknown group `{id}`; known groups: {}", known.join(", "));
        }
    }
    Ok(all
        .into_iter()
        .filter(|g| only.iter().any(|o| o == g.id))
        .collect())
}
