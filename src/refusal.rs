//! The error that owns its exit code, so the CLI can tell drift (1) from errors (2).

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

/// Exit code for an error: a [`Refusal`] carries its own, an anchor drift is 1, the rest 2.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if let Some(r) = err.downcast_ref::<Refusal>() {
        return r.exit_code();
    }
    if err.downcast_ref::<crate::engine::anchor::Drift>().is_some() {
        return EXIT_DRIFT;
    }
    EXIT_ERROR
}
