//! Locating the SGLang package under `--sglang-root`, and telling which release and layout
//! era it is.
//!
//! Accepted roots: a git checkout (holding `python/sglang/`), its `python/` folder, or any
//! folder holding an installed or unpacked `sglang/` package (site-packages, an unpacked
//! wheel). All paths the engine handles are relative to the folder that holds `sglang/`
//! (the "package parent"); diffs prefix them with the way from the root to that folder so
//! `git apply` works from the root.

use crate::era::{cmp_versions, newest, oldest, releases, Era, ERAS};
use crate::source_file::read_regular;
use anyhow::{bail, Result};
use serde::Serialize;
use std::cmp::Ordering;
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize)]
pub struct SglangTree {
    /// What the user passed.
    #[serde(serialize_with = "lossy_path")]
    pub root: PathBuf,
    /// The folder holding `sglang/`.
    #[serde(rename = "package_parent", serialize_with = "lossy_path")]
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
        let layout = Era::of_layout(&parent);
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
    /// Whether every selected group has a form for the era is checked by the caller (`commands`).
    pub fn support(&self) -> Support {
        let no = |reason: String| Support {
            supported: false,
            reason,
        };
        let Some(layout) = self.layout else {
            let probes: Vec<String> = ERAS.iter().rev().map(|r| r.probe.describe()).collect();
            return no(format!(
                "layout not recognised: none of {} found",
                probes.join(", ")
            ));
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

/// Release version and where it came from: `sglang/_version.py` (generated at build time),
/// a `sglang-*.dist-info/METADATA` beside the package, or a top-level `__version__ = "..."`
/// in `sglang/version.py` (older releases; newer ones compute it there at import time).
fn read_version(parent: &Path) -> Option<(String, String)> {
    let assigned = |file: &Path| -> Option<String> {
        let bytes = read_regular(file).ok()??;
        let text = String::from_utf8(bytes).ok()?;
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

/// A path as JSON text even when it is not UTF-8 (undecodable bytes become U+FFFD), so
/// `--json` output stays valid for any root.
fn lossy_path<S: serde::Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&path.to_string_lossy())
}
