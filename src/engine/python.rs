//! Asking CPython whether texts compile, and whether a module imports.
//!
//! tree-sitter is error-tolerant about indentation (an inconsistent dedent parses fine), so
//! every file the engine writes is also compiled by a real interpreter. All files go to one
//! interpreter process as JSON on stdin: one start-up, not one per file.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Environment variable naming the interpreter when `--python` is not given.
pub const PYTHON_ENV: &str = "KVTUNER_PYTHON";

#[derive(Debug, Clone)]
pub struct Python {
    pub exe: PathBuf,
}

const COMPILE_SCRIPT: &str = r#"
import json, sys
failures = []
for name, src in json.load(sys.stdin):
    try:
        compile(src, name, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        where = f"line {e.lineno}: " if getattr(e, "lineno", None) else ""
        failures.append([name, f"{where}{type(e).__name__}: {getattr(e, 'msg', e)}"])
json.dump(failures, sys.stdout)
"#;

impl Python {
    /// `--python PATH`, else `$KVTUNER_PYTHON`, else `python3` on PATH.
    pub fn pick(cli: Option<PathBuf>) -> Self {
        let exe = cli
            .or_else(|| {
                std::env::var_os(PYTHON_ENV)
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from("python3"));
        Python { exe }
    }

    /// Compile every `(name, source)`; returns `(name, message)` for each that does not compile.
    pub fn compile_failures(&self, files: &[(String, &str)]) -> Result<Vec<(String, String)>> {
        if files.is_empty() {
            return Ok(Vec::new());
        }
        let input = serde_json::to_vec(files)?;
        let mut child = Command::new(&self.exe)
            .args(["-I", "-c", COMPILE_SCRIPT])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot run Python interpreter {} (set --python or ${PYTHON_ENV})",
                    self.exe.display()
                )
            })?;
        child.stdin.take().expect("piped").write_all(&input)?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "Python interpreter {} failed while compiling: {}",
                self.exe.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("unexpected output from the compile helper")
    }

    /// `Ok(())` if `import module` works in this interpreter, else the error it printed.
    pub fn check_import(&self, module: &str) -> Result<std::result::Result<(), String>> {
        let out = Command::new(&self.exe)
            .args(["-c", &format!("import {module}")])
            .output()
            .with_context(|| format!("cannot run Python interpreter {}", self.exe.display()))?;
        if out.status.success() {
            Ok(Ok(()))
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            Ok(Err(err
                .lines()
                .last()
                .unwrap_or("import failed")
                .to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compile_reports_bad_indentation() {
        let py = Python::pick(None);
        let good = "class A:\n    x = 1\n";
        let bad = "class A:\n    x = 1\n   y = 2\n";
        let fails = py
            .compile_failures(&[("good.py".into(), good), ("bad.py".into(), bad)])
            .unwrap();
        assert_eq!(fails.len(), 1);
        assert_eq!(fails[0].0, "bad.py");
        assert!(fails[0].1.contains("line 3"), "{}", fails[0].1);
    }
}
