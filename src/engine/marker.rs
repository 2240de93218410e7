//! Begin/end marker comments around injected blocks, and the content hash they carry.
//!
//! ```text
//!     # >>> kvtuner-patch:kvtuner/memory-fields sha256=<hash of the lines in between>
//!     ...injected lines...
//!     # <<< kvtuner-patch:kvtuner/memory-fields
//! ```
//!
//! Markers are the *second* signal that a patch is applied (the first is the injected code
//! itself, see `engine/plan/`). Their job is to make a hand-edited block visible: `verify` and
//! `status` recompute the hash of the lines between the markers and call a mismatch drift.
//! Injected whole files carry a one-line header of the same shape instead (see [`file_header`]).

use crate::fsio::sha256;
use std::ops::Range;

const BEGIN: &str = "# >>> kvtuner-patch:";
const END: &str = "# <<< kvtuner-patch:";
const FILE: &str = "# kvtuner-patch:";

/// Wrap `body` (already indented, whole lines ending in `\n`) in markers at `indent`.
pub fn wrap(indent: &str, tag: &str, body: &str) -> String {
    debug_assert!(body.is_empty() || body.ends_with('\n'));
    format!(
        "{indent}{BEGIN}{tag} sha256={}\n{body}{indent}{END}{tag}\n",
        sha256(body.as_bytes())
    )
}

/// A marked block found in a file.
#[derive(Debug, Clone)]
pub struct Block {
    /// `group/patch`.
    pub tag: String,
    /// Hash written in the begin marker.
    pub declared: String,
    /// Hash of the lines between the markers as they are now.
    pub actual: String,
    /// Bytes from the start of the begin line to the end of the end line.
    pub range: Range<usize>,
    /// 1-based line of the begin marker.
    pub line: usize,
}

impl Block {
    pub fn intact(&self) -> bool {
        self.declared == self.actual
    }
}

/// Every marked block in `src`, or a description of the first malformed marker pair.
pub fn find_blocks(src: &str) -> Result<Vec<Block>, String> {
    let mut out = Vec::new();
    let mut open: Option<(String, String, usize, usize, usize)> = None; // tag, hash, begin, body start, line
    let mut pos = 0;
    for (i, line) in src.split_inclusive('\n').enumerate() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix(BEGIN) {
            if let Some((tag, ..)) = &open {
                return Err(format!(
                    "line {}: marker for {tag} opened again before it was closed",
                    i + 1
                ));
            }
            let (tag, hash) = rest.split_once(" sha256=").unwrap_or((rest, ""));
            open = Some((
                tag.to_string(),
                hash.trim().to_string(),
                pos,
                pos + line.len(),
                i + 1,
            ));
        } else if let Some(tag) = t.strip_prefix(END) {
            match open.take() {
                Some((open_tag, hash, begin, body, line_no)) if open_tag == tag => {
                    out.push(Block {
                        actual: sha256(&src.as_bytes()[body..pos]),
                        tag: open_tag,
                        declared: hash,
                        range: begin..pos + line.len(),
                        line: line_no,
                    })
                }
                Some((open_tag, ..)) => {
                    return Err(format!(
                        "line {}: end marker for {tag} closes {open_tag}",
                        i + 1
                    ));
                }
                None => {
                    return Err(format!(
                        "line {}: end marker for {tag} without a begin marker",
                        i + 1
                    ))
                }
            }
        }
        pos += line.len();
    }
    if let Some((tag, _, _, _, line)) = open {
        return Err(format!(
            "line {line}: begin marker for {tag} is never closed"
        ));
    }
    Ok(out)
}

/// Header line put on top of an injected whole file.
pub fn file_header(tag: &str, content: &str) -> String {
    format!(
        "{FILE}{tag} sha256={} (injected file; do not edit)\n",
        sha256(content.as_bytes())
    )
}

/// For an injected file: `Some(intact)` if it starts with our header for `tag`.
pub fn check_file_header(tag: &str, text: &str) -> Option<bool> {
    let (first, rest) = text.split_once('\n')?;
    let declared = first
        .strip_prefix(FILE)?
        .strip_prefix(tag)?
        .strip_prefix(" sha256=")?;
    let declared = declared.split_whitespace().next()?;
    Some(declared == sha256(rest.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_then_find_is_intact_and_edit_is_detected() {
        let block = wrap("    ", "g/p", "    x = 1\n");
        let src = format!("class A:\n{block}    y = 2\n");
        let found = find_blocks(&src).unwrap();
        assert_eq!(found.len(), 1);
        assert!(found[0].intact());
        assert_eq!(found[0].tag, "g/p");
        assert_eq!(&src[found[0].range.clone()], block);
        let edited = src.replace("x = 1", "x = 2");
        assert!(!find_blocks(&edited).unwrap()[0].intact());
    }

    #[test]
    fn malformed_markers_are_errors() {
        assert!(find_blocks("# >>> kvtuner-patch:g/p sha256=00\n").is_err());
        assert!(find_blocks("# <<< kvtuner-patch:g/p\n").is_err());
    }

    #[test]
    fn file_header_round_trip() {
        let text = format!("{}print(1)\n", file_header("g/f", "print(1)\n"));
        assert_eq!(check_file_header("g/f", &text), Some(true));
        assert_eq!(
            check_file_header("g/f", &text.replace("1)", "2)")),
            Some(false)
        );
        assert_eq!(check_file_header("g/other", &text), None);
    }
}
