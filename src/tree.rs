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

/// Newest release this tool was built and tested against.
pub const NEWEST_TESTED: &str = "0.5.23";
/// Releases whose full apply/verify/revert cycle is tested (the real-tree test).
pub const TESTED: &[&str] = &["0.5.23"];

/// How a release lays out what the patch groups touch (see docs/../sglang-anchors.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Era {
    /// <= 0.5.13: `@dataclass ServerArgs` + explicit `parser.add_argument`.
    DataclassAddArgument,
    /// 0.5.14 - 0.5.19: `ServerArgs` fields `A[T, Arg(...)]`, CLI generated.
    AnnotatedServerArgs,
    /// 0.5.20 - 0.5.23: `class Memory(msgspec.Struct)` in `arg_groups/fields/memory.py`.
    MemoryStruct,
}

impl Era {
    pub fn describe(self) -> &'static str {
        match self {
            Era::DataclassAddArgument => {
                "server args as a dataclass with parser.add_argument (<= 0.5.13)"
            }
            Era::AnnotatedServerArgs => {
                "server args as Annotated ServerArgs fields (0.5.14 - 0.5.19)"
            }
            Era::MemoryStruct => {
                "memory args in arg_groups/fields/memory.py Memory struct (0.5.20 - 0.5.23)"
            }
        }
    }

    /// Release range (inclusive) of the era, for versions that can be read.
    fn range(self) -> (&'static str, &'static str) {
        match self {
            Era::DataclassAddArgument => ("0.0", "0.5.13.post999"),
            Era::AnnotatedServerArgs => ("0.5.14", "0.5.19.post999"),
            Era::MemoryStruct => ("0.5.20", "0.5.23.post999"),
        }
    }
}

/// The eras the current patch groups can handle.
pub const SUPPORTED_ERAS: &[Era] = &[Era::MemoryStruct];

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
    pub era: Option<Era>,
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
        let era = detect_era(&parent);
        Ok(SglangTree {
            root: root.to_path_buf(),
            parent,
            prefix: prefix.to_string(),
            version,
            version_source,
            era,
        })
    }

    /// Absolute path of a package-relative path such as `sglang/srt/x.py`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.parent.join(rel)
    }

    /// Whether the patch groups can be applied to this tree, and why (not).
    pub fn support(&self) -> Support {
        let Some(era) = self.era else {
            return Support {
                supported: false,
                reason: "layout not recognised: no arg_groups/fields/memory.py, arg_groups/arg_utils.py or server_args.py under sglang/srt".into(),
            };
        };
        if let Some(v) = &self.version {
            if cmp_versions(v, NEWEST_TESTED) == Ordering::Greater {
                return Support {
                    supported: false,
                    reason: format!(
                        "SGLang {v} is newer than the newest release this tool knows ({NEWEST_TESTED}); \
                         run `status` to see which anchors still match and update kvtuner-patch"
                    ),
                };
            }
            let (lo, hi) = era.range();
            if cmp_versions(v, lo) == Ordering::Less || cmp_versions(v, hi) == Ordering::Greater {
                return Support {
                    supported: false,
                    reason: format!(
                        "SGLang {v} has the layout of another era ({}); refusing a mixed tree",
                        era.describe()
                    ),
                };
            }
        }
        if !SUPPORTED_ERAS.contains(&era) {
            return Support {
                supported: false,
                reason: format!(
                    "era not supported yet: {}; supported: {}",
                    era.describe(),
                    SUPPORTED_ERAS
                        .iter()
                        .map(|e| e.describe())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            };
        }
        let tested = match &self.version {
            Some(v) if TESTED.contains(&v.as_str()) => format!("SGLang {v} (tested)"),
            Some(v) => format!("SGLang {v} (same era as tested {})", TESTED.join(", ")),
            None => "SGLang of unknown version (layout matches)".to_string(),
        };
        Support {
            supported: true,
            reason: format!("{tested}: {}", era.describe()),
        }
    }
}

fn detect_era(parent: &Path) -> Option<Era> {
    let srt = parent.join("sglang/srt");
    if srt.join("arg_groups/fields/memory.py").is_file() {
        Some(Era::MemoryStruct)
    } else if srt.join("arg_groups/arg_utils.py").is_file() {
        Some(Era::AnnotatedServerArgs)
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
}
