//! Paths the tool writes, renames or deletes: relative, normalised, inside the root, and reached
//! without a symlink.
//!
//! Every path comes from the groups or from the manifest, and the manifest is read from the tree
//! it describes: untrusted input. A path is accepted only if it is relative, has no `.`, `..` or
//! empty component, and no folder on the way to it (from the root down) is a symlink, so that
//! nothing outside `--sglang-root` can be reached, even by a tree built to do so.

use std::fmt;
use std::path::{Path, PathBuf};

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathProblem {
    NotRelative,
    NotNormalised,
    ThroughSymlink(String),
    IsSymlink,
}

impl fmt::Display for PathProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathProblem::NotRelative => write!(f, "is not a relative path"),
            PathProblem::NotNormalised => {
                write!(f, "has an empty, `.` or `..` component")
            }
            PathProblem::ThroughSymlink(dir) => {
                write!(f, "is reached through the symlink {dir}")
            }
            PathProblem::IsSymlink => write!(f, "is a symlink"),
        }
    }
}

/// `rel` is relative and normalised: `a/b/c.py`, never `/a`, `a/../b`, `./a`, `a//b` or `a\b`.
pub fn check_normalised(rel: &str) -> Result<(), PathProblem> {
    if rel.is_empty() || rel.starts_with('/') {
        return Err(PathProblem::NotRelative);
    }
    let bad =
        |c: &str| c.is_empty() || c == "." || c == ".." || c.contains('\\') || c.contains('\0');
    if rel.trim_end_matches('/').split('/').any(bad) {
        return Err(PathProblem::NotNormalised);
    }
    Ok(())
}

/// `base/rel`, after checking that `rel` is normalised and that no existing folder between
/// `base` and the final component is a symlink. The final component may not exist yet; when
/// it exists it may not be a symlink either.
pub fn inside(base: &Path, rel: &str) -> Result<PathBuf, PathProblem> {
    check_normalised(rel)?;
    let mut path = base.to_path_buf();
    let parts: Vec<&str> = rel.trim_end_matches('/').split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(if i + 1 == parts.len() {
                    PathProblem::IsSymlink
                } else {
                    PathProblem::ThroughSymlink(parts[..=i].join("/"))
                });
            }
            Ok(_) => {}
            // Nothing below a missing folder exists either: no symlink can be on the way.
            Err(_) => {
                path.extend(&parts[i + 1..]);
                return Ok(path);
            }
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_relative_normalised_paths_pass() {
        for good in ["a", "a/b.py", "sglang/srt/x/", "a.b/c"] {
            assert_eq!(check_normalised(good), Ok(()), "{good}");
        }
        for bad in ["/etc/passwd", ""] {
            assert_eq!(
                check_normalised(bad),
                Err(PathProblem::NotRelative),
                "{bad}"
            );
        }
        for bad in [
            "../x",
            "a/../../x",
            "a/./b",
            "a//b",
            ".",
            "a\\..\\b",
            "a/\0",
        ] {
            assert_eq!(
                check_normalised(bad),
                Err(PathProblem::NotNormalised),
                "{bad}"
            );
        }
    }

    #[test]
    fn symlinks_on_the_way_or_at_the_end_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path();
        std::fs::create_dir_all(base.join("pkg/real")).unwrap();
        std::os::unix::fs::symlink("/tmp", base.join("pkg/link")).unwrap();
        std::os::unix::fs::symlink("real", base.join("pkg/file")).unwrap();
        assert_eq!(
            inside(base, "pkg/real/new.py"),
            Ok(base.join("pkg/real/new.py"))
        );
        assert_eq!(
            inside(base, "pkg/missing/deeper/x"),
            Ok(base.join("pkg/missing/deeper/x"))
        );
        assert_eq!(
            inside(base, "pkg/link/x.py"),
            Err(PathProblem::ThroughSymlink("pkg/link".into()))
        );
        assert_eq!(inside(base, "pkg/file"), Err(PathProblem::IsSymlink));
    }
}
