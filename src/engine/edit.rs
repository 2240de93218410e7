//! Byte-range edits, the one place where they are applied to a source text, and what one patch
//! changes ([`PatchEdit`]).
//!
//! Every change the engine makes to an existing file is an [`Edit`]: a byte range of the
//! original text and its replacement (an empty range is an insertion). Planning code only
//! produces edits; [`apply_edits`] is the single function that turns them into new text, so
//! overlap checking lives in exactly one place.

use std::fmt;
use std::ops::Range;

/// Replace `range` (byte offsets into the original text) with `text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub range: Range<usize>,
    pub text: String,
}

/// What one patch changes on the tree as it is now.
#[derive(Debug, Clone)]
pub enum PatchEdit {
    Edits { rel: String, edits: Vec<Edit> },
    Create { rel: String, text: String },
}

impl Edit {
    pub fn insert(at: usize, text: impl Into<String>) -> Self {
        Edit {
            range: at..at,
            text: text.into(),
        }
    }

    pub fn replace(range: Range<usize>, text: impl Into<String>) -> Self {
        Edit {
            range,
            text: text.into(),
        }
    }
}

/// Why a set of edits could not be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EditError {
    /// Two edits touch the same bytes (or insert at the same point, whose order would be ambiguous).
    Overlap {
        first: Range<usize>,
        second: Range<usize>,
    },
    /// An edit reaches past the end of the text or splits a UTF-8 character.
    OutOfBounds { range: Range<usize>, len: usize },
}

impl fmt::Display for EditError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EditError::Overlap { first, second } => write!(
                f,
                "overlapping edits at bytes {}..{} and {}..{}",
                first.start, first.end, second.start, second.end
            ),
            EditError::OutOfBounds { range, len } => write!(
                f,
                "edit at bytes {}..{} is outside a {len}-byte text or splits a character",
                range.start, range.end
            ),
        }
    }
}

impl std::error::Error for EditError {}

/// Apply `edits` to `src` as if simultaneously (offsets refer to the original `src`).
///
/// Fails without producing anything if two edits overlap. Two insertions at the same offset
/// also count as overlap: their relative order would be a guess.
pub fn apply_edits(src: &str, edits: &[Edit]) -> Result<String, EditError> {
    let mut sorted: Vec<&Edit> = edits.iter().collect();
    sorted.sort_by_key(|e| (e.range.start, e.range.end));
    for e in &sorted {
        let r = &e.range;
        if r.start > r.end
            || r.end > src.len()
            || !src.is_char_boundary(r.start)
            || !src.is_char_boundary(r.end)
        {
            return Err(EditError::OutOfBounds {
                range: r.clone(),
                len: src.len(),
            });
        }
    }
    for pair in sorted.windows(2) {
        let (a, b) = (&pair[0].range, &pair[1].range);
        if a.end > b.start || (a.start == b.start && (a.is_empty() || b.is_empty())) {
            return Err(EditError::Overlap {
                first: a.clone(),
                second: b.clone(),
            });
        }
    }
    let extra: usize = sorted.iter().map(|e| e.text.len()).sum();
    let mut out = String::with_capacity(src.len() + extra);
    let mut pos = 0;
    for e in sorted {
        out.push_str(&src[pos..e.range.start]);
        out.push_str(&e.text);
        pos = e.range.end;
    }
    out.push_str(&src[pos..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_in_offset_order_regardless_of_input_order() {
        let src = "abcdef";
        let out = apply_edits(
            src,
            &[
                Edit::replace(4..5, "E"),
                Edit::insert(0, ">"),
                Edit::replace(1..3, ""),
            ],
        )
        .unwrap();
        assert_eq!(out, ">adEf");
    }

    #[test]
    fn overlap_is_an_error() {
        let err = apply_edits(
            "abcdef",
            &[Edit::replace(1..4, "x"), Edit::replace(3..5, "y")],
        )
        .unwrap_err();
        assert_eq!(
            err,
            EditError::Overlap {
                first: 1..4,
                second: 3..5
            }
        );
    }

    #[test]
    fn two_inserts_at_one_point_are_ambiguous() {
        assert!(apply_edits("ab", &[Edit::insert(1, "x"), Edit::insert(1, "y")]).is_err());
    }

    #[test]
    fn adjacent_edits_are_fine() {
        assert_eq!(
            apply_edits(
                "abcd",
                &[Edit::replace(0..2, "X"), Edit::replace(2..4, "Y")]
            )
            .unwrap(),
            "XY"
        );
    }

    #[test]
    fn out_of_bounds_is_an_error() {
        assert!(matches!(
            apply_edits("ab", &[Edit::insert(3, "x")]),
            Err(EditError::OutOfBounds { .. })
        ));
        assert!(matches!(
            apply_edits("é", &[Edit::insert(1, "x")]),
            Err(EditError::OutOfBounds { .. })
        ));
    }
}
