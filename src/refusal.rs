//! The errors the CLI tells apart, and the one place that turns any error into an exit code
//! and a message ([`Failure`]): drift (1) from errors (2).

use serde::Serialize;
use std::fmt;

/// Exit code: done / clean.
pub const EXIT_OK: i32 = 0;
/// Exit code: not applied, drift (an anchor moved, a block was edited), or differences.
pub const EXIT_DRIFT: i32 = 1;
/// Exit code: error (bad arguments, unsupported tree, invalid result, I/O).
pub const EXIT_ERROR: i32 = 2;

/// What kind of refusal: it decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// The tree is not what the patches expect (exit 1).
    Drift,
    /// Cannot be done: unsupported tree, invalid result, missing requirement (exit 2).
    Error,
}

/// A command that stopped before changing anything, with what to tell the user.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
    pub problems: Vec<String>,
}

impl Refusal {
    pub fn drift(message: impl Into<String>) -> Self {
        Self::drifts(message, Vec::new())
    }

    pub fn drifts(message: impl Into<String>, problems: Vec<String>) -> Self {
        Refusal {
            kind: RefusalKind::Drift,
            message: message.into(),
            problems,
        }
    }

    pub fn error(message: impl Into<String>, problems: Vec<String>) -> Self {
        Refusal {
            kind: RefusalKind::Error,
            message: message.into(),
            problems,
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self.kind {
            RefusalKind::Drift => EXIT_DRIFT,
            RefusalKind::Error => EXIT_ERROR,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Refusal {}

/// An anchor that did not match exactly once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drift {
    /// `group/patch`.
    pub patch: String,
    /// File (or folder searched) where the anchor was looked for.
    pub file: String,
    pub looked_for: String,
    pub matches: usize,
    /// Where the matches were, when there were several.
    pub locations: Vec<String>,
    /// Files of a searched folder that were not read (not regular, too large, ...), with why:
    /// the anchor may be in one of them.
    pub unread: Vec<String>,
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: looked for {}: found {} match{} (expected exactly 1)",
            self.patch,
            self.file,
            self.looked_for,
            self.matches,
            if self.matches == 1 { "" } else { "es" }
        )?;
        if !self.locations.is_empty() {
            write!(f, " at {}", self.locations.join(", "))?;
        }
        if !self.unread.is_empty() {
            write!(f, "; not read: {}", self.unread.join(", "))?;
        }
        Ok(())
    }
}

impl std::error::Error for Drift {}

/// Exit code for an error: a [`Refusal`] carries its own, an anchor [`Drift`] is 1, the rest 2.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if let Some(r) = err.downcast_ref::<Refusal>() {
        return r.exit_code();
    }
    if err.downcast_ref::<Drift>().is_some() {
        return EXIT_DRIFT;
    }
    EXIT_ERROR
}

/// How a command that failed ends: its exit code, and what to tell the user.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub exit_code: i32,
    /// The refusal's message, or the whole error chain of any other error.
    pub message: String,
    /// A refusal's list of problems (empty for other errors).
    pub problems: Vec<String>,
    /// The error chain as one text, for the plain-text report.
    #[serde(skip)]
    pub text: String,
}

impl Failure {
    pub fn of(err: &anyhow::Error) -> Self {
        let refusal = err.downcast_ref::<Refusal>();
        Failure {
            exit_code: exit_code(err),
            message: refusal.map_or_else(|| format!("{err:#}"), |r| r.message.clone()),
            problems: refusal.map(|r| r.problems.clone()).unwrap_or_default(),
            text: format!("{err:#}"),
        }
    }
}
