//! Helpers shared by the integration tests: fixture copies, whole-tree byte snapshots, CLI runs.
#![allow(dead_code)]

use assert_cmd::Command;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use walkdir::WalkDir;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    repo().join("fixtures").join(name)
}

/// Copy a folder into a fresh temporary directory (optionally below `sub`).
pub fn copy_tree(from: &Path, sub: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join(sub);
    fs::create_dir_all(&dest).unwrap();
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(&dest)
        .status()
        .unwrap();
    assert!(status.success(), "cp -a {} failed", from.display());
    tmp
}

/// Every file's bytes (and every folder), keyed by relative path: "the tree" for equality checks.
pub fn snapshot(root: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    for e in WalkDir::new(root).sort_by_file_name() {
        let e = e.unwrap();
        let rel = e
            .path()
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .to_string();
        let content = if e.file_type().is_file() {
            Some(fs::read(e.path()).unwrap())
        } else {
            None
        };
        out.insert(rel, content);
    }
    out
}

/// Assert two snapshots are equal, naming the first difference (not dumping megabytes).
pub fn assert_same_tree(
    a: &BTreeMap<String, Option<Vec<u8>>>,
    b: &BTreeMap<String, Option<Vec<u8>>>,
) {
    for (k, v) in a {
        match b.get(k) {
            None => panic!("{k} is missing afterwards"),
            Some(w) if w != v => panic!("{k} differs"),
            _ => {}
        }
    }
    for k in b.keys() {
        assert!(a.contains_key(k), "{k} appeared");
    }
}

pub fn cli() -> Command {
    let mut c = Command::cargo_bin("kvtuner-patch").unwrap();
    c.env_remove("KVTUNER_SGLANG_ROOT")
        .env_remove("KVTUNER_PYTHON");
    c
}

/// Run the CLI: (exit code, stdout, stderr).
pub fn run(args: &[&str], root: &Path) -> (i32, String, String) {
    let out = cli()
        .args(args)
        .arg("--sglang-root")
        .arg(root)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

pub fn run_json(args: &[&str], root: &Path) -> (i32, serde_json::Value) {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let (code, out, err) = run(&a, root);
    let v = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {out}\nstderr: {err}"));
    (code, v)
}

/// `git apply --check` (and then a real `git apply`) of `diff` in a git repo made of `root`.
pub fn git_apply(root: &Path, diff: &str, really: bool) {
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .expect("git is installed");
        assert!(
            out.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    if !root.join(".git").exists() {
        git(&["init", "-q"]);
    }
    // Outside the repo (git would see it) and unique per call (tests run in parallel).
    let patch = tempfile::NamedTempFile::new().unwrap();
    fs::write(patch.path(), diff).unwrap();
    let p = patch.path().to_str().unwrap();
    git(&["apply", "--check", p]);
    if really {
        git(&["apply", p]);
    }
}
