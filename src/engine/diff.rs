//! Unified diffs with git-style `a/` `b/` headers, accepted by `git apply` and `patch -p1`.

use similar::TextDiff;

/// Diff of one file; `path` is relative to the `--sglang-root` (so `git apply` works there).
/// `before == None` is a new file, `after == None` a deleted one.
pub fn unified(path: &str, before: Option<&str>, after: Option<&str>) -> String {
    let old = before.unwrap_or("");
    let new = after.unwrap_or("");
    if before.is_some() && old == new {
        return String::new();
    }
    let mut out = format!("diff --git a/{path} b/{path}\n");
    let (from, to) = match (before, after) {
        (None, _) => {
            out.push_str("new file mode 100644\n");
            ("/dev/null".to_string(), format!("b/{path}"))
        }
        (_, None) => {
            out.push_str("deleted file mode 100644\n");
            (format!("a/{path}"), "/dev/null".to_string())
        }
        _ => (format!("a/{path}"), format!("b/{path}")),
    };
    let diff = TextDiff::from_lines(old, new);
    out.push_str(
        &diff
            .unified_diff()
            .context_radius(3)
            .header(&from, &to)
            .to_string(),
    );
    out
}
