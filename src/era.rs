//! The SGLang releases this tool supports, and the table of layout eras they fall into.
//!
//! One place for each fact: the releases are `scripts/releases.txt` (read by the release
//! matrix script too); an era is one row of [`ERAS`] (name, first release, how to recognise its
//! files, a one-line summary). Which releases an era spans is derived from the two, never typed.
//! Adding an era row makes the compiler name every group form to write (each group matches on
//! [`Era`] without a wildcard); `docs/adding-a-release.md` walks through it.

use crate::source_file::read_regular;
use serde::{Serialize, Serializer};
use std::cmp::Ordering;
use std::fs;
use std::path::Path;

/// The SGLang releases this tool supports and the release matrix checks, oldest first.
const RELEASES_TXT: &str = include_str!("../scripts/releases.txt");

/// Supported releases, oldest first (comments and blank lines of `releases.txt` skipped).
pub fn releases() -> Vec<&'static str> {
    RELEASES_TXT
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// Oldest supported release (first line of `releases.txt`).
pub fn oldest() -> &'static str {
    releases()[0]
}

/// Newest supported release (last line of `releases.txt`).
pub fn newest() -> &'static str {
    releases().last().expect("releases.txt lists releases")
}

/// How a release lays out what the patch groups touch: one variant per row of [`ERAS`],
/// oldest first. Everything else about an era is in its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Era {
    DataclassAddArgument,
    AnnotatedServerArgs,
    NamespacedServerArgs,
    MemoryStruct,
}

/// How the files of a tree show its era. Probes are tried newest era first; the first that
/// matches names the layout.
#[derive(Debug, Clone, Copy)]
pub enum LayoutProbe {
    /// This package-relative file exists.
    File(&'static str),
    /// This package-relative file defines `class NAME` at top level.
    FileDefinesClass {
        file: &'static str,
        class: &'static str,
    },
}

/// One layout era.
#[derive(Debug, Clone, Copy)]
pub struct EraRow {
    pub era: Era,
    /// Short name: the JSON spelling and what tables show.
    pub name: &'static str,
    /// First release of the era; it lasts until the next row's first release.
    pub first_release: &'static str,
    pub probe: LayoutProbe,
    /// One line for humans (`status` adds the releases it spans).
    pub summary: &'static str,
}

/// Every era, oldest first (`ERAS[era as usize].era == era`, checked by a test).
pub const ERAS: [EraRow; 4] = [
    EraRow {
        era: Era::DataclassAddArgument,
        name: "dataclass-add-argument",
        first_release: "0.5.3",
        probe: LayoutProbe::File("sglang/srt/server_args.py"),
        summary: "server args as a dataclass with parser.add_argument",
    },
    EraRow {
        era: Era::AnnotatedServerArgs,
        name: "annotated-server-args",
        first_release: "0.5.14",
        probe: LayoutProbe::File("sglang/srt/arg_groups/arg_utils.py"),
        summary: "server args as Annotated ServerArgs fields",
    },
    EraRow {
        // 0.5.17 added the namespace marker class `NS` (every field carries one; SGLang builds
        // the runtime config bags, `get_memory().<field>`, from them).
        era: Era::NamespacedServerArgs,
        name: "namespaced-server-args",
        first_release: "0.5.17",
        probe: LayoutProbe::FileDefinesClass {
            file: "sglang/srt/arg_groups/arg_utils.py",
            class: "NS",
        },
        summary: "server args as Annotated ServerArgs fields with NS(...) namespaces",
    },
    EraRow {
        era: Era::MemoryStruct,
        name: "memory-struct",
        first_release: "0.5.20",
        probe: LayoutProbe::File("sglang/srt/arg_groups/fields/memory.py"),
        summary: "memory args in arg_groups/fields/memory.py Memory struct",
    },
];

impl Era {
    /// Every era, oldest first.
    pub fn all() -> impl DoubleEndedIterator<Item = Era> {
        ERAS.iter().map(|r| r.era)
    }

    /// The newest era: the last row of the table.
    pub fn newest() -> Era {
        ERAS[ERAS.len() - 1].era
    }

    pub fn row(self) -> &'static EraRow {
        &ERAS[self as usize]
    }

    /// Short name (the JSON spelling), for tables.
    pub fn name(self) -> &'static str {
        self.row().name
    }

    /// The summary with the releases of the list the era spans, e.g. `... (0.5.20 - 0.5.23)`.
    pub fn describe(self) -> String {
        format!("{} ({})", self.row().summary, self.release_range())
    }

    /// The listed releases of this era, oldest first.
    pub fn releases(self) -> Vec<&'static str> {
        releases()
            .into_iter()
            .filter(|v| Era::of_release(v) == Some(self))
            .collect()
    }

    /// `first - last` of [`Era::releases`] (one release: itself; none listed yet: `from X`).
    pub fn release_range(self) -> String {
        match self.releases()[..] {
            [] => format!("from {}", self.row().first_release),
            [one] => one.to_string(),
            [first, .., last] => format!("{first} - {last}"),
        }
    }

    /// The era of a release between the oldest and the newest supported one (inclusive),
    /// or `None` outside that range.
    pub fn of_release(version: &str) -> Option<Era> {
        if cmp_versions(version, oldest()) == Ordering::Less
            || cmp_versions(version, newest()) == Ordering::Greater
        {
            return None;
        }
        ERAS.iter()
            .rev()
            .find(|r| cmp_versions(version, r.first_release) != Ordering::Less)
            .map(|r| r.era)
    }

    /// The era whose layout probe matches the files under `parent` (the folder holding
    /// `sglang/`), newest first; `None` when no probe does.
    pub fn of_layout(parent: &Path) -> Option<Era> {
        ERAS.iter()
            .rev()
            .find(|r| r.probe.matches(parent))
            .map(|r| r.era)
    }
}

impl Serialize for Era {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl LayoutProbe {
    fn matches(self, parent: &Path) -> bool {
        match self {
            // Present in any form: a FIFO or link there is the era's file gone wrong, which the
            // anchor lookups then name, not a sign of another era.
            LayoutProbe::File(file) => fs::symlink_metadata(parent.join(file)).is_ok(),
            LayoutProbe::FileDefinesClass { file, class } => {
                let bytes = read_regular(&parent.join(file))
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                let text = String::from_utf8_lossy(&bytes);
                text.lines().any(|l| {
                    l.strip_prefix("class ")
                        .and_then(|rest| rest.strip_prefix(class))
                        .is_some_and(|rest| rest.starts_with(':') || rest.starts_with('('))
                })
            }
        }
    }

    /// What the probe looks for, for the "layout not recognised" message.
    pub fn describe(self) -> String {
        match self {
            LayoutProbe::File(file) => file.to_string(),
            LayoutProbe::FileDefinesClass { file, class } => format!("class {class} in {file}"),
        }
    }
}

/// Compare release versions such as `0.5.23`, `0.5.3.post1`, `0.5.24.dev3` (PEP 440 subset):
/// numeric parts first; then `.devN` < release < `.postN`.
pub fn cmp_versions(a: &str, b: &str) -> Ordering {
    fn key(v: &str) -> (Vec<u64>, i64, u64) {
        let mut nums = Vec::new();
        let mut phase = 0i64; // -1 dev/pre, 0 release, 1 post
        let mut extra = 0u64;
        for part in v.split('.') {
            if let Ok(n) = part.parse::<u64>() {
                if phase == 0 {
                    nums.push(n);
                }
                continue;
            }
            let digits: String = part.chars().filter(|c| c.is_ascii_digit()).collect();
            let lead: String = part.chars().take_while(|c| c.is_ascii_digit()).collect();
            if !lead.is_empty() && phase == 0 {
                nums.push(lead.parse().unwrap_or(0)); // `23rc1`
            }
            phase = if part.contains("post") { 1 } else { -1 };
            extra = digits.trim_start_matches(&lead[..]).parse().unwrap_or(0);
        }
        while nums.last() == Some(&0) && nums.len() > 1 {
            nums.pop();
        }
        (nums, phase, extra)
    }
    key(a).cmp(&key(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_order() {
        assert_eq!(cmp_versions("0.5.23", "0.5.3"), Ordering::Greater);
        assert_eq!(cmp_versions("0.5.3.post1", "0.5.3"), Ordering::Greater);
        assert_eq!(cmp_versions("0.5.24.dev3", "0.5.24"), Ordering::Less);
        assert_eq!(cmp_versions("0.5.24.dev3", "0.5.23"), Ordering::Greater);
        assert_eq!(cmp_versions("0.5.23", "0.5.23.post999"), Ordering::Less);
        assert_eq!(cmp_versions("0.5.20", "0.5.20"), Ordering::Equal);
    }

    /// The table is in variant order and oldest first; the list is sorted (the matrix and
    /// `newest()` rely on it); every listed release has an era and every era at least one
    /// listed release, starting with its first.
    #[test]
    fn era_table_covers_the_release_list() {
        for (i, row) in ERAS.iter().enumerate() {
            assert_eq!(row.era as usize, i, "{row:?} out of place");
            assert_eq!(serde_json::to_value(row.era).unwrap(), row.name);
        }
        for w in ERAS.windows(2) {
            assert_eq!(
                cmp_versions(w[0].first_release, w[1].first_release),
                Ordering::Less
            );
        }
        let rel = releases();
        assert_eq!(ERAS[0].first_release, oldest());
        for w in rel.windows(2) {
            assert_eq!(
                cmp_versions(w[0], w[1]),
                Ordering::Less,
                "{w:?} out of order"
            );
        }
        for v in &rel {
            assert!(Era::of_release(v).is_some(), "{v}");
        }
        for e in Era::all() {
            assert_eq!(e.releases().first(), Some(&e.row().first_release), "{e:?}");
        }
        assert_eq!(Era::newest(), Era::of_release(newest()).unwrap());
    }

    /// Facts about past releases (they cannot change) and the ends of the list.
    #[test]
    fn era_of_a_release() {
        let era = Era::of_release;
        assert_eq!(era("0.5.3"), Some(Era::DataclassAddArgument));
        assert_eq!(era("0.5.13.post1"), Some(Era::DataclassAddArgument));
        assert_eq!(era("0.5.14"), Some(Era::AnnotatedServerArgs));
        assert_eq!(era("0.5.16"), Some(Era::AnnotatedServerArgs));
        assert_eq!(era("0.5.17"), Some(Era::NamespacedServerArgs));
        assert_eq!(era("0.5.19"), Some(Era::NamespacedServerArgs));
        assert_eq!(era("0.5.20"), Some(Era::MemoryStruct));
        assert_eq!(era("0.5.2"), None, "older than the list");
        assert_eq!(
            era("0.5.3.dev1"),
            None,
            "a pre-release of the oldest is older"
        );
        assert_eq!(
            era(&format!("{}.post1", newest())),
            None,
            "newer than the list"
        );
        assert_eq!(
            Era::DataclassAddArgument.release_range(),
            "0.5.3 - 0.5.13.post1"
        );
        assert!(Era::DataclassAddArgument
            .describe()
            .ends_with("parser.add_argument (0.5.3 - 0.5.13.post1)"));
    }
}
