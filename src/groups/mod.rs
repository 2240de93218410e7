//! The registry of patch groups: data only (the engine in `engine/` is generic over
//! [`PatchKind`](crate::patch::PatchKind)).
//!
//! A group is a `groups/<group>.rs` with `pub fn group(era: Era) -> Option<Group>`: one form per
//! layout era (a `match` on [`Era`] without a wildcard, so a new era row makes the compiler name
//! every form to write), `None` where the group cannot patch that era yet: such a tree is
//! refused for that group, by name, instead of being half-patched. The order of [`REGISTRY`]
//! is the order groups are applied and reported in. Which form each group has per era:
//! `docs/compat.md`; how to add a release or an era: `docs/adding-a-release.md`.

use crate::era::Era;
use crate::patch::Group;

/// The injected Python package `patches/kvtuner_hicache/` (`hostpool` injects it, `juicefs`
/// adds its backend to it), as a package-relative folder and as a dotted module. A macro, so
/// `include_str!`/`concat!` paths can be built from it; [`PACKAGE_DIR`] is the one to use
/// elsewhere.
#[macro_export]
macro_rules! kvtuner_package {
    (dir) => {
        "sglang/srt/mem_cache/kvtuner_hicache"
    };
    (module) => {
        "sglang.srt.mem_cache.kvtuner_hicache"
    };
}

/// The patch that injects `patches/kvtuner_hicache/FILE` (embedded at build time) as
/// `FILE` of the package.
macro_rules! package_module {
    ($id:literal, $file:literal) => {
        Patch {
            id: $id,
            what: concat!("inject kvtuner_hicache/", $file),
            kind: PatchKind::InjectFile {
                dest: concat!(kvtuner_package!(dir), "/", $file),
                source: include_str!(concat!("../../patches/kvtuner_hicache/", $file)),
            },
        }
    };
}

// After the macros above: the group modules use them.
pub mod hostpool;
pub mod juicefs;
pub mod kvtuner;

/// Package-relative folder of the injected package (see [`kvtuner_package!`]).
pub const PACKAGE_DIR: &str = kvtuner_package!(dir);

/// One registered group.
pub struct Entry {
    pub id: &'static str,
    /// A few words for `--only`'s help.
    pub about: &'static str,
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
        about: "server arguments",
        for_era: kvtuner::group,
        requires: &[],
    },
    Entry {
        id: hostpool::ID,
        about: "quantizing host pool",
        for_era: hostpool::group,
        requires: &[],
    },
    Entry {
        // Its backend module lives in the package `hostpool` injects.
        id: juicefs::ID,
        about: "storage backend",
        for_era: juicefs::group,
        requires: &[hostpool::ID],
    },
];

/// `--only`'s help: the registered groups, what each is, and what it needs.
pub fn only_help() -> String {
    let groups: Vec<String> = REGISTRY
        .iter()
        .map(|e| match e.requires {
            [] => format!("{} ({})", e.id, e.about),
            req => format!(
                "{} ({}; needs {} applied or selected)",
                e.id,
                e.about,
                req.join(", ")
            ),
        })
        .collect();
    format!(
        "Only this patch group (repeatable). Groups: {}.",
        groups.join(", ")
    )
}

/// The groups `id` requires.
pub fn requires(id: &str) -> &'static [&'static str] {
    REGISTRY
        .iter()
        .find(|e| e.id == id)
        .map_or(&[], |e| e.requires)
}

/// For a group written for the newest era only (`Entry { for_era: |era| newest_only(era,
/// x::group), .. }`): no form for the older ones.
pub fn newest_only(era: Era, group: fn() -> Group) -> Option<Group> {
    (era == Era::newest()).then(group)
}

/// The eras a registered group has a form for.
pub fn eras_of(entry: &Entry) -> Vec<Era> {
    Era::all()
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

    /// The help lists every group, and `juicefs` as needing `hostpool`.
    #[test]
    fn only_help_names_every_group() {
        assert_eq!(
            only_help(),
            "Only this patch group (repeatable). Groups: kvtuner (server arguments), hostpool \
             (quantizing host pool), juicefs (storage backend; needs hostpool applied or selected)."
        );
    }

    /// The folder and the module of the package are the same path.
    #[test]
    fn package_dir_and_module_agree() {
        assert_eq!(PACKAGE_DIR.replace('/', "."), kvtuner_package!(module));
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
                about: "",
                for_era: kvtuner::group,
                requires: &[],
            },
            Entry {
                id: "toy",
                about: "",
                for_era: |era| newest_only(era, toy),
                requires: &[],
            },
        ];
        let sel = select_from(&registry, &[], Era::newest()).unwrap();
        assert_eq!(sel.groups.len(), 2);
        assert!(sel.unsupported.is_empty());
        let sel = select_from(&registry, &[], Era::DataclassAddArgument).unwrap();
        assert_eq!(sel.groups.len(), 1);
        assert_eq!(sel.unsupported.len(), 1);
        let (id, why) = &sel.unsupported[0];
        assert_eq!(id, "toy");
        assert_eq!(
            why,
            &format!(
                "group `toy` has no form for era dataclass-add-argument yet (it supports: {})",
                Era::newest().name()
            )
        );
        let only = ["kvtuner".to_string()];
        let sel = select_from(&registry, &only, Era::DataclassAddArgument).unwrap();
        assert!(sel.groups.len() == 1 && sel.unsupported.is_empty());
        assert!(select_from(&registry, &["nope".into()], Era::newest()).is_err());
    }
}
