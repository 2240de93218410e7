//! The registry of patch groups.
//!
//! To add a group (e.g. `hostpool`, `juicefs`): write its injected Python under
//! `patches/<group>/`, add `groups/<group>.rs` with a `pub fn group() -> Group` built from
//! the [`PatchKind`](crate::group::PatchKind)s it needs, and list it in [`REGISTRY`]. The
//! order of [`REGISTRY`] is the order groups are applied and reported in.
//!
//! SGLang moves things between releases, so a group has one form per layout [`Era`] it
//! supports (`kvtuner` adds dataclass fields + `add_argument` calls in one era and annotated
//! fields in the others). An entry maps an era to the group's form for it, or to `None` where
//! the group cannot patch that era yet: such a tree is refused for that group, by name,
//! instead of being half-patched. A group written for the newest era only registers as
//! `Entry { id: "x", for_era: |era| newest_only(era, x::group), requires: &[] }`.
//!
//! Every registered group has a form for every era (details in each group's module and in
//! `docs/compat.md`):
//!
//! | era | releases | `kvtuner` | `hostpool` pool choice | `juicefs` choice |
//! | --- | --- | --- | --- | --- |
//! | `dataclass-add-argument` | 0.5.3 - 0.5.13.post1 | dataclass fields + `add_argument` calls | `__new__` of `MHATokenToKVPoolHost` | appended to the `add_argument` action |
//! | `annotated-server-args` | 0.5.14 - 0.5.16 | `A[T, Arg(...)]` fields | `get_mha_host_pool_cls` | `ServerArgs` field `choices` |
//! | `namespaced-server-args` | 0.5.17 - 0.5.19 | the same with `NS("memory")` | `get_mha_host_pool_cls` | `ServerArgs` field `choices` |
//! | `memory-struct` | 0.5.20 - 0.5.23 | `class Memory` fields | `get_mha_host_pool_cls` | `Memory` field `choices` |

use crate::group::Group;
use crate::tree::Era;

pub mod hostpool;
pub mod juicefs;
pub mod kvtuner;

/// One registered group.
pub struct Entry {
    pub id: &'static str,
    /// The group's form for an era, `None` where it has none (yet).
    pub for_era: fn(Era) -> Option<Group>,
    /// Groups that must be applied with (or before) this one: `apply --only` it alone on a
    /// tree without them is refused, naming them (never pulled in silently).
    pub requires: &'static [&'static str],
}

/// Every group, in apply order (a group after the ones it requires).
pub const REGISTRY: &[Entry] = &[
    Entry {
        id: kvtuner::ID,
        for_era: kvtuner::group,
        requires: &[],
    },
    Entry {
        id: hostpool::ID,
        for_era: hostpool::group,
        requires: &[],
    },
    Entry {
        // Its backend module lives in the package `hostpool` injects.
        id: juicefs::ID,
        for_era: juicefs::group,
        requires: &[hostpool::ID],
    },
];

/// The groups `id` requires.
pub fn requires(id: &str) -> &'static [&'static str] {
    REGISTRY
        .iter()
        .find(|e| e.id == id)
        .map_or(&[], |e| e.requires)
}

/// For groups that only know the newest layout (`Era::MemoryStruct`, 0.5.20 - 0.5.23).
pub fn newest_only(era: Era, group: fn() -> Group) -> Option<Group> {
    (era == Era::MemoryStruct).then(group)
}

/// The eras a registered group has a form for.
pub fn eras_of(entry: &Entry) -> Vec<Era> {
    Era::ALL
        .into_iter()
        .filter(|e| (entry.for_era)(*e).is_some())
        .collect()
}

/// The groups selected by `--only` (all when `only` is empty) for `era`.
pub struct Selection {
    /// Groups with a form for the era, in apply order.
    pub groups: Vec<Group>,
    /// Selected groups without one: (id, why).
    pub unsupported: Vec<(String, String)>,
}

/// Groups selected by `--only` for `era`, or an error naming an unknown id.
pub fn select(only: &[String], era: Era) -> anyhow::Result<Selection> {
    select_from(REGISTRY, only, era)
}

fn select_from(registry: &[Entry], only: &[String], era: Era) -> anyhow::Result<Selection> {
    let known: Vec<&str> = registry.iter().map(|e| e.id).collect();
    for id in only {
        if !known.contains(&id.as_str()) {
            anyhow::bail!("unknown group `{id}`; known groups: {}", known.join(", "));
        }
    }
    let mut sel = Selection {
        groups: Vec::new(),
        unsupported: Vec::new(),
    };
    for entry in registry {
        if !only.is_empty() && !only.iter().any(|o| o == entry.id) {
            continue;
        }
        match (entry.for_era)(era) {
            Some(g) => sel.groups.push(g),
            None => sel.unsupported.push((
                entry.id.to_string(),
                format!(
                    "group `{}` has no form for era {} yet (it supports: {})",
                    entry.id,
                    era.name(),
                    eras_of(entry)
                        .iter()
                        .map(|e| e.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }
    Ok(sel)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Group ids are unique, every form carries its registered id, and patch ids are unique
    /// within a form (the `group/patch` marker tag must identify one block).
    #[test]
    fn registry_is_consistent() {
        let mut ids: Vec<&str> = REGISTRY.iter().map(|e| e.id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), REGISTRY.len());
        for entry in REGISTRY {
            for era in eras_of(entry) {
                let g = (entry.for_era)(era).unwrap();
                assert_eq!(g.id, entry.id);
                let mut p: Vec<&str> = g.patches.iter().map(|p| p.id).collect();
                p.sort();
                p.dedup();
                assert_eq!(p.len(), g.patches.len(), "{} {era:?}", g.id);
            }
        }
        // A required group exists and comes earlier (apply order).
        for (i, entry) in REGISTRY.iter().enumerate() {
            for r in entry.requires {
                let at = REGISTRY.iter().position(|e| e.id == *r);
                assert!(at.is_some_and(|at| at < i), "{} requires {r}", entry.id);
            }
        }
    }

    /// A group written for the newest layout only: selected there, reported (not silently
    /// dropped) on older eras, and `--only` can leave it out.
    #[test]
    fn a_newest_only_group_is_unsupported_on_older_eras() {
        fn toy() -> Group {
            Group {
                id: "toy",
                summary: "toy",
                patches: vec![],
            }
        }
        let registry = [
            Entry {
                id: kvtuner::ID,
                for_era: kvtuner::group,
                requires: &[],
            },
            Entry {
                id: "toy",
                for_era: |era| newest_only(era, toy),
                requires: &[],
            },
        ];
        let sel = select_from(&registry, &[], Era::MemoryStruct).unwrap();
        assert_eq!(sel.groups.len(), 2);
        assert!(sel.unsupported.is_empty());
        let sel = select_from(&registry, &[], Era::DataclassAddArgument).unwrap();
        assert_eq!(sel.groups.len(), 1);
        assert_eq!(sel.unsupported.len(), 1);
        let (id, why) = &sel.unsupported[0];
        assert_eq!(id, "toy");
        assert_eq!(
            why,
            "group `toy` has no form for era dataclass-add-argument yet (it supports: memory-struct)"
        );
        let only = ["kvtuner".to_string()];
        let sel = select_from(&registry, &only, Era::DataclassAddArgument).unwrap();
        assert!(sel.groups.len() == 1 && sel.unsupported.is_empty());
        assert!(select_from(&registry, &["nope".into()], Era::MemoryStruct).is_err());
    }
}
