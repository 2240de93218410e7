//! Helpers shared by the integration tests: fixture copies, whole-tree byte snapshots, CLI runs.
#![allow(dead_code)]

use assert_cmd::Command;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use walkdir::WalkDir;

/// Files the groups edit or create, relative to the folder holding `sglang/`.
pub const MEMORY: &str = "sglang/srt/arg_groups/fields/memory.py";
pub const HOOK: &str = "sglang/srt/arg_groups/hicache_hook.py";
pub const CONTROLLER: &str = "sglang/srt/managers/cache_controller.py";
pub const MHA: &str = "sglang/srt/mem_cache/pool_host/mha.py";
pub const MLA: &str = "sglang/srt/mem_cache/pool_host/mla.py";
pub const FACTORY: &str = "sglang/srt/mem_cache/storage/backend_factory.py";
pub const SERVER_ARGS: &str = "sglang/srt/server_args.py";
pub const PACKAGE: &str = kvtuner_patch::groups::PACKAGE_DIR;

/// The files `hostpool` and `juicefs` inject into [`PACKAGE`], as `apply` lists them
/// (comma-separated).
pub fn injected_package_files() -> String {
    injected_files_under("patches/kvtuner_hicache")
}

/// The Python files under `dir` (a folder of `patches/kvtuner_hicache`, subfolders included) as
/// `apply` lists them once injected into [`PACKAGE`] (comma-separated, sorted).
pub fn injected_files_under(dir: &str) -> String {
    let package = repo().join("patches/kvtuner_hicache");
    let mut files: Vec<String> = WalkDir::new(repo().join(dir))
        .into_iter()
        .map(|e| e.unwrap().into_path())
        .filter(|p| p.extension().is_some_and(|x| x == "py"))
        .map(|p| {
            let rel = p
                .strip_prefix(&package)
                .unwrap()
                .to_string_lossy()
                .to_string();
            format!("{PACKAGE}/{rel}")
        })
        .collect();
    files.sort();
    files.join(", ")
}

/// The unpacked wheel of a real SGLang release (downloaded once and cached by
/// `scripts/sglang-wheel.sh`). No network means the calling test FAILS, loudly: never skipped.
pub fn release_tree(version: &str) -> PathBuf {
    let script = repo().join("scripts/sglang-wheel.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(version)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "downloading SGLang {version} with {} failed (network or PyPI unreachable?): {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(
        dir.join("sglang/srt").is_dir(),
        "{} holds no sglang/srt",
        dir.display()
    );
    dir
}

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

/// A fixture tree with a mutation applied, in a fresh temporary directory.
///
/// `fixtures/mutated/NAME.toml` names a `base` fixture and the edits that turn it into a tree
/// the tool must refuse (or handle specially): `[[replace]]` (`file`, `find`, `with`; `find`
/// must occur exactly once unless `all = true`) and `[[create]]` (`file`, `text`). Keeping the
/// mutation as a few lines over a shared base, instead of a full copy of the tree, shows what
/// is different and keeps the base the single place to change.
pub fn mutated_fixture(name: &str) -> tempfile::TempDir {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Mutation {
        base: String,
        #[serde(default)]
        replace: Vec<Replace>,
        #[serde(default)]
        create: Vec<Create>,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Replace {
        file: String,
        find: String,
        with: String,
        #[serde(default)]
        all: bool,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Create {
        file: String,
        text: String,
    }
    let spec_path = fixture("mutated").join(format!("{name}.toml"));
    let spec =
        fs::read_to_string(&spec_path).unwrap_or_else(|e| panic!("{}: {e}", spec_path.display()));
    let m: Mutation =
        toml::from_str(&spec).unwrap_or_else(|e| panic!("{}: {e}", spec_path.display()));
    let t = copy_tree(&fixture(&m.base), "");
    for r in &m.replace {
        let path = t.path().join(&r.file);
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {}: {e}", r.file));
        let n = text.matches(&r.find).count();
        assert!(
            n > 0 && (r.all || n == 1),
            "{name}: `{}` occurs {n} times in {} (want {})",
            r.find,
            r.file,
            if r.all {
                "at least once"
            } else {
                "exactly once"
            }
        );
        fs::write(&path, text.replace(&r.find, &r.with)).unwrap();
    }
    for c in &m.create {
        let path = t.path().join(&c.file);
        assert!(!path.exists(), "{name}: {} exists in {}", c.file, m.base);
        fs::write(&path, c.text.trim_start()).unwrap();
    }
    t
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
    assert_same_entries(a, b, "afterwards");
}

/// Assert two path-keyed maps are equal, naming the first path that differs (`context` says
/// when).
pub fn assert_same_entries<V: PartialEq>(
    want: &BTreeMap<String, V>,
    got: &BTreeMap<String, V>,
    context: &str,
) {
    for (k, v) in want {
        match got.get(k) {
            None => panic!("{context}: {k} is missing"),
            Some(w) if w != v => panic!("{context}: {k} differs"),
            _ => {}
        }
    }
    for k in got.keys() {
        assert!(want.contains_key(k), "{context}: {k} appeared");
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

/// The end of every apply cycle on a patched tree: a second `apply` (with `only`, e.g.
/// `["--only", "kvtuner"]`) changes nothing and says so, `status` reports it applied (exit 0),
/// and `revert` gives back exactly `original`.
pub fn assert_reapply_is_noop_and_revert_restores(
    root: &Path,
    only: &[&str],
    original: &BTreeMap<String, Option<Vec<u8>>>,
) {
    let applied = snapshot(root);
    let args: Vec<&str> = ["apply"].iter().chain(only).copied().collect();
    let (code, out, err) = run(&args, root);
    assert!(code == 0 && out.contains("nothing to do"), "{out}{err}");
    assert_same_tree(&applied, &snapshot(root));
    let args: Vec<&str> = ["status"].iter().chain(only).copied().collect();
    let (code, out, _) = run(&args, root);
    assert_eq!(code, 0, "status after apply: {out}");
    let (code, _, err) = run(&["revert"], root);
    assert_eq!(code, 0, "{err}");
    assert_same_tree(original, &snapshot(root));
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

/// `diff` with the bodies (and line counts) of created files left out: injected files are
/// copies of `patches/` (tested there), and a snapshot holding them would go stale with every
/// edit of that Python. Headers and edits of existing files stay, so the snapshot still pins
/// what is created where and every in-place edit.
pub fn elide_new_files(diff: &str) -> String {
    let mut out = String::new();
    let mut new_file = false;
    for line in diff.split_inclusive('\n') {
        if line.starts_with("diff --git ") {
            new_file = false;
        } else if line.starts_with("new file mode ") {
            new_file = true;
        } else if new_file && line.starts_with("@@ ") {
            out.push_str("@@ -0,0 +1,N @@\n[added lines elided: embedded from patches/]\n");
            continue;
        } else if new_file && line.starts_with('+') && !line.starts_with("+++ ") {
            continue;
        }
        out.push_str(line);
    }
    out
}

/// Run `python3 -B -c script` with `PYTHONPATH=root`: Ok(stdout) or Err(stderr).
pub fn python_in(root: &Path, script: &str) -> Result<String, String> {
    let out = std::process::Command::new("python3")
        .args(["-B", "-c", script])
        .env("PYTHONPATH", root)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}
