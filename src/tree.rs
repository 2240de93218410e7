//! Locating the SGLang package under `--sglang-root`, and telling which release and layout
//! era it is.
//!
//! Accepted roots: a git checkout (holding `python/sglang/`), its `python/` folder, or any
//! folder holding an installed or unpacked `sglang/` package (site-packages, an unpacked
//! wheel). All paths the engine handles are relative to the folder that holds `sglang/`
//! (the "package parent"); diffs prefix them with the way from the root to that folder so
//! `git apply` works from the root.

use anyhow::{bail, Result};
use serde::Serialize;
use std::cmp::Ordering;
use std::fs;
use std::path::{Path, PathBuf};

/// The SGLang releases this tool supports and the release matrix checks, oldest first: the
/// repository's `scripts/releases.txt` (one place for the list, read by the matrix script too).
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

/// How a release lays out what the patch groups touch (see `docs/compat.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Era {
    /// 0.5.3 - 0.5.13: `@dataclass ServerArgs` + explicit `parser.add_argument`.
    DataclassAddArgument,
    /// 0.5.14 - 0.5.16: `ServerArgs` fields `A[T, Arg(...)]`, CLI generated.
    AnnotatedServerArgs,
    /// 0.5.17 - 0.5.19: as before, and every field also carries a namespace marker
    /// `NS("memory")` that builds the runtime config bags (`get_memory().<field>`).
    NamespacedServerArgs,
    /// 0.5.20 - 0.5.23: `class Memory(msgspec.Struct)` in `arg_groups/fields/memory.py`.
    MemoryStruct,
}

impl Era {
    /// Every era, oldest first.
    pub const ALL: [Era; 4] = [
        Era::DataclassAddArgument,
        Era::AnnotatedServerArgs,
        Era::NamespacedServerArgs,
        Era::MemoryStruct,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Era::DataclassAddArgument => {
                "server args as a dataclass with parser.add_argument (0.5.3 - 0.5.13)"
            }
            Era::AnnotatedServerArgs => {
                "server args as Annotated ServerArgs fields (0.5.14 - 0.5.16)"
            }
            Era::NamespacedServerArgs => {
                "server args as Annotated ServerArgs fields with NS(...) namespaces (0.5.17 - 0.5.19)"
            }
            Era::MemoryStruct => {
                "memory args in arg_groups/fields/memory.py Memory struct (0.5.20 - 0.5.23)"
            }
        }
    }

    /// Short name (the JSON spelling), for tables.
    pub fn name(self) -> &'static str {
        match self {
            Era::DataclassAddArgument => "dataclass-add-argument",
            Era::AnnotatedServerArgs => "annotated-server-args",
            Era::NamespacedServerArgs => "namespaced-server-args",
            Era::MemoryStruct => "memory-struct",
        }
    }

    /// First release of the era. An era lasts until the next one starts; the first era starts
    /// (for this tool) at the oldest supported release.
    fn first(self) -> &'static str {
        match self {
            Era::DataclassAddArgument => "0.5.3",
            Era::AnnotatedServerArgs => "0.5.14",
            Era::NamespacedServerArgs => "0.5.17",
            Era::MemoryStruct => "0.5.20",
        }
    }

    /// The era of a release between the oldest and the newest supported one (inclusive;
    /// `.postN` of the newest included), or `None` outside that range.
    pub fn of_release(version: &str) -> Option<Era> {
        if cmp_versions(version, oldest()) == Ordering::Less
            || cmp_versions(version, newest()) == Ordering::Greater
        {
            return None;
        }
        Era::ALL
            .into_iter()
            .rev()
            .find(|e| cmp_versions(version, e.first()) != Ordering::Less)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SglangTree {
    /// What the user passed.
    pub root: PathBuf,
    /// The folder holding `sglang/`.
    #[serde(rename = "package_parent")]
    pub parent: PathBuf,
    /// Path from `root` to `parent` with a trailing `/` (or empty), for diff headers.
    pub prefix: String,
    pub version: Option<String>,
    /// Where the version was read from.
    pub version_source: Option<String>,
    /// The era the patch groups are chosen for: the era of the release when the version is
    /// known and supported, else the one the layout looks like (`None`: not recognised).
    pub era: Option<Era>,
    /// The era the files on disk look like (which arg files exist).
    pub layout: Option<Era>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Support {
    pub supported: bool,
    pub reason: String,
}

impl SglangTree {
    pub fn resolve(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            bail!("--sglang-root {}: not a directory", root.display());
        }
        let candidates = [("python/", root.join("python")), ("", root.to_path_buf())];
        let Some((prefix, parent)) = candidates
            .into_iter()
            .find(|(_, p)| p.join("sglang/srt").is_dir())
        else {
            bail!(
                "--sglang-root {}: no SGLang package found: expected `python/sglang/srt/` (git checkout) or \
                 `sglang/srt/` (its python/ folder, site-packages, an unpacked wheel)",
                root.display()
            );
        };
        let (version, version_source) = match read_version(&parent) {
            Some((v, s)) => (Some(v), Some(s)),
            None => (None, None),
        };
        let layout = detect_era(&parent);
        let era = version.as_deref().and_then(Era::of_release).or(layout);
        Ok(SglangTree {
            root: root.to_path_buf(),
            parent,
            prefix: prefix.to_string(),
            version,
            version_source,
            era,
            layout,
        })
    }

    /// Absolute path of a package-relative path such as `sglang/srt/x.py`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.parent.join(rel)
    }

    /// Whether this tree is a release the patch groups can be applied to, and why (not).
    /// Whether every selected group has a form for the era is checked by the caller (`ops`).
    pub fn support(&self) -> Support {
        let no = |reason: String| Support {
            supported: false,
            reason,
        };
        let Some(layout) = self.layout else {
            return no("layout not recognised: no arg_groups/fields/memory.py, arg_groups/arg_utils.py or server_args.py under sglang/srt".into());
        };
        let (oldest, newest) = (oldest(), newest());
        let Some(v) = &self.version else {
            return Support {
                supported: true,
                reason: format!(
                    "SGLang of unknown version (no _version.py, version.py or dist-info); layout: {}",
                    layout.describe()
                ),
            };
        };
        if cmp_versions(v, newest) == Ordering::Greater {
            return no(format!(
                "SGLang {v} is newer than the newest release this tool knows ({newest}); \
                 the anchors below show what still matches: update kvtuner-patch before applying"
            ));
        }
        if cmp_versions(v, oldest) == Ordering::Less {
            return no(format!(
                "SGLang {v} is older than the oldest release this tool supports ({oldest}); \
                 its host-pool and storage APIs differ: upgrade SGLang to {oldest} or newer"
            ));
        }
        let era = Era::of_release(v).expect("in range");
        if era != layout {
            return no(format!(
                "SGLang {v} should have the layout of era {} but its files look like era {}; \
                 refusing a mixed tree",
                era.name(),
                layout.name()
            ));
        }
        let listed = if releases().contains(&v.as_str()) {
            "in the release matrix"
        } else {
            "not in the release matrix; era by release range"
        };
        Support {
            supported: true,
            reason: format!("SGLang {v} ({listed}): {}", era.describe()),
        }
    }
}

fn detect_era(parent: &Path) -> Option<Era> {
    let srt = parent.join("sglang/srt");
    if srt.join("arg_groups/fields/memory.py").is_file() {
        Some(Era::MemoryStruct)
    } else if srt.join("arg_groups/arg_utils.py").is_file() {
        // 0.5.17 added the namespace marker class there, at top level.
        let utils = fs::read_to_string(srt.join("arg_groups/arg_utils.py")).unwrap_or_default();
        if utils
            .lines()
            .any(|l| l.starts_with("class NS:") || l.starts_with("class NS("))
        {
            Some(Era::NamespacedServerArgs)
        } else {
            Some(Era::AnnotatedServerArgs)
        }
    } else if srt.join("server_args.py").is_file() {
        Some(Era::DataclassAddArgument)
    } else {
        None
    }
}

/// Release version and where it came from: `sglang/_version.py` (generated at build time),
/// a `sglang-*.dist-info/METADATA` beside the package, or a top-level `__version__ = "..."`
/// in `sglang/version.py` (older releases; newer ones compute it there at import time).
fn read_version(parent: &Path) -> Option<(String, String)> {
    let assigned = |file: &Path| -> Option<String> {
        let text = fs::read_to_string(file).ok()?;
        text.lines()
            .filter(|l| l.starts_with("__version__"))
            .find_map(|l| l.rsplit(['"', '\'']).nth(1).map(str::to_string))
    };
    for rel in ["sglang/_version.py", "sglang/version.py"] {
        if let Some(v) = assigned(&parent.join(rel)) {
            return Some((v, rel.to_string()));
        }
    }
    let entries = fs::read_dir(parent).ok()?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("sglang-") && name.ends_with(".dist-info") {
            let meta = fs::read_to_string(e.path().join("METADATA")).ok()?;
            if let Some(v) = meta.lines().find_map(|l| l.strip_prefix("Version: ")) {
                return Some((v.trim().to_string(), format!("{name}/METADATA")));
            }
        }
    }
    None
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

    /// Every release of the list has an era; the era boundaries are releases of the list; the
    /// list is sorted (the matrix and `newest()` rely on it).
    #[test]
    fn era_table_covers_the_release_list() {
        let rel = releases();
        assert_eq!(
            rel.len(),
            37,
            "scripts/releases.txt changed: update this test and the docs"
        );
        assert_eq!((oldest(), newest()), ("0.5.3", "0.5.23"));
        for w in rel.windows(2) {
            assert_eq!(
                cmp_versions(w[0], w[1]),
                Ordering::Less,
                "{w:?} out of order"
            );
        }
        for e in Era::ALL {
            assert!(
                rel.contains(&e.first()),
                "{e:?} starts at an unlisted release"
            );
        }
        let era = |v| Era::of_release(v);
        assert_eq!(era("0.5.3"), Some(Era::DataclassAddArgument));
        assert_eq!(era("0.5.13.post1"), Some(Era::DataclassAddArgument));
        assert_eq!(era("0.5.14"), Some(Era::AnnotatedServerArgs));
        assert_eq!(era("0.5.16"), Some(Era::AnnotatedServerArgs));
        assert_eq!(era("0.5.17"), Some(Era::NamespacedServerArgs));
        assert_eq!(era("0.5.19"), Some(Era::NamespacedServerArgs));
        assert_eq!(era("0.5.20"), Some(Era::MemoryStruct));
        assert_eq!(era("0.5.23"), Some(Era::MemoryStruct));
        assert_eq!(era("0.5.2"), None, "older than the list");
        assert_eq!(
            era("0.5.3.dev1"),
            None,
            "a pre-release of the oldest is older"
        );
        assert_eq!(era("0.5.23.post1"), None, "newer than the list");
        assert_eq!(era("0.5.24.dev3"), None);
        for e in Era::ALL {
            assert_eq!(
                serde_json::to_value(e).unwrap(),
                e.name(),
                "JSON and tables agree"
            );
        }
        let counts = Era::ALL.map(|e| rel.iter().filter(|v| era(v) == Some(e)).count());
        assert_eq!(counts, [26, 4, 3, 4]);
    }
}
