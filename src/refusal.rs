//! The error that carries an exit code, so the CLI can tell drift (1) from errors (2).

use std::fmt;

/// Exit code: done / clean.
pub const EXIT_OK: i32 = 0;
/// Exit code: not applied, drift (an anchor moved, a block was edited), or differences.
pub const EXIT_DRIFT: i32 = 1;
/// Exit code: error (bad arguments, unsupported tree, invalid result, I/O).
pub const EXIT_ERROR: i32 = 2;

#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: i32,
    pub message: String,
    pub problems: Vec<String>,
}

impl Refusal {
    pub fn drift(message: impl Into<String>) -> Self {
        Refusal {
            code: EXIT_DRIFT,
            message: message.into(),
            problems: Vec::new(),
        }
    }

    pub fn drifts(message: impl Into<String>, problems: Vec<String>) -> Self {
        Refusal {
            code: EXIT_DRIFT,
            message: message.into(),
            problems,
        }
    }

    pub fn error(message: impl Into<String>, problems: Vec<String>) -> Self {
        Refusal {
            code: EXIT_ERROR,
            message: message.into(),
            problems,
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
        return r.code;
    }
    if err.downcast_ref::<crate::anchor::Drift>().is_some() {
        return EXIT_DRIFT;
    }
    EXIT_ERROR
}
