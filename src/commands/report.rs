//! What every command hands the front door ([`Report`]): its exit code and its text report;
//! the JSON report is the report itself, in one envelope for every command.

use super::{GroupState, GroupStatus};
use crate::refusal::EXIT_OK;
use serde::Serialize;

/// A command's report, rendered by the command module that made it.
pub trait Report: Serialize {
    fn exit_code(&self) -> i32;

    /// Whether the JSON envelope says `ok`: by default, whether the exit code is 0.
    fn ok(&self) -> bool {
        self.exit_code() == EXIT_OK
    }

    /// The text report (`--json` not given).
    fn render(&self, text: &mut Text);

    /// An interrupted operation this run rolled back first: said on stderr in either format.
    fn recovered(&self) -> Option<&str> {
        None
    }

    /// The JSON report: `{"ok", "exit_code", "report"}`.
    fn envelope(&self) -> serde_json::Value
    where
        Self: Sized,
    {
        serde_json::json!({"ok": self.ok(), "exit_code": self.exit_code(), "report": self})
    }
}

/// A text report: what goes to stdout, and the remarks that go to stderr.
#[derive(Debug, Default)]
pub struct Text {
    pub stdout: String,
    pub stderr: String,
}

impl Text {
    /// One line of the report.
    pub fn line(&mut self, line: impl AsRef<str>) {
        self.stdout.push_str(line.as_ref());
        self.stdout.push('\n');
    }

    /// Text of the report as it is (a diff ends its own lines).
    pub fn raw(&mut self, text: &str) {
        self.stdout.push_str(text);
    }

    /// One line on stderr: a remark about the run, not part of the report.
    pub fn remark(&mut self, line: impl AsRef<str>) {
        self.stderr.push_str(line.as_ref());
        self.stderr.push('\n');
    }

    /// Each group's state and, under it, its problems (`status` and `verify`).
    pub fn groups(&mut self, groups: &[GroupStatus]) {
        for g in groups {
            let state = match g.state {
                GroupState::Applied => "applied",
                GroupState::NotApplied => "not applied",
                GroupState::Drifted => "DRIFTED",
            };
            self.line(format!("  {:<10} {:<12} {}", g.id, state, g.summary));
            for p in g.problems() {
                self.line(format!("      - {p}"));
            }
        }
    }
}
