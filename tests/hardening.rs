//! The CLI keeps its promises when things go wrong (issue 10): a crash at any file-system step
//! of `apply` or `revert`, two writers at once, a hostile manifest, a reinstalled release,
//! symlinks, unwritable folders, odd encodings and pathological files. Every test drives the
//! real binary on a copy of the 0.5.23 fixture; crashes are real SIGKILLs delivered by
//! `strace -e inject=SYSCALL:signal=SIGKILL:when=N` at the N-th call of each file-system
//! syscall, for every N the operation makes.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command as Proc, Stdio};
use std::time::{Duration, Instant};

/// The file-system steps a crash is injected at (every name strace knows on x86_64 for a
/// rename, unlink, mkdir, rmdir, fsync, mode change or link).
const FS_STEPS: &[&str] = &[
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "mkdir",
    "mkdirat",
    "rmdir",
    "fsync",
    "fdatasync",
    "chmod",
    "fchmod",
    "fchmodat",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
];

/// One entry of a tree as "pristine" compares it: kind, permission bits and content.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Dir(u32),
    File(u32, Vec<u8>),
    Link(PathBuf),
    Other(u32),
}

/// Every path below `root` (symlinks not followed) with its kind, mode and bytes.
fn full_snapshot(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).sort_by_file_name() {
        let e = e.unwrap();
        let rel = e
            .path()
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .to_string();
        let meta = fs::symlink_metadata(e.path()).unwrap();
        let mode = meta.mode() & 0o7777;
        let entry = if meta.file_type().is_symlink() {
            Entry::Link(fs::read_link(e.path()).unwrap())
        } else if meta.is_dir() {
            Entry::Dir(mode)
        } else if meta.is_file() {
            Entry::File(mode, fs::read(e.path()).unwrap())
        } else {
            Entry::Other(mode)
        };
        out.insert(rel, entry);
    }
    out
}

/// Assert the tree at `root` is exactly `want` (every path, kind, mode and byte).
fn assert_pristine(want: &BTreeMap<String, Entry>, root: &Path, context: &str) {
    assert_same_entries(want, &full_snapshot(root), context);
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kvtuner-patch"))
}

/// Run the CLI with `args` on `root`; (exit code or -signal, stdout, stderr). A run longer
/// than `limit` is killed and reported as a hang.
fn run_limited(args: &[&str], root: &Path, limit: Duration) -> (i32, String, String) {
    let mut child = Proc::new(bin())
        .args(args)
        .arg("--sglang-root")
        .arg(root)
        .env_remove("KVTUNER_SGLANG_ROOT")
        .env_remove("KVTUNER_PYTHON")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read both pipes while waiting: a child blocked on a full pipe is not a hang.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut s).ok();
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut s).ok();
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            child.kill().ok();
            child.wait().ok();
            panic!("kvtuner-patch {args:?} still running after {limit:?} (hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        exit_code(&status),
        String::from_utf8_lossy(&out_reader.join().unwrap()).to_string(),
        String::from_utf8_lossy(&err_reader.join().unwrap()).to_string(),
    )
}

fn exit_code(status: &std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| -status.signal().unwrap_or(0))
}

/// Exit codes 0/1/2 only, never a panic message.
fn assert_documented_exit(code: i32, err: &str, what: &str) {
    assert!(
        (0..=2).contains(&code),
        "{what}: exit {code} (not 0/1/2): {err}"
    );
    assert!(!err.contains("panicked"), "{what}: panicked: {err}");
}

fn ok(args: &[&str], root: &Path, what: &str) -> String {
    let (code, out, err) = run_limited(args, root, Duration::from_secs(60));
    assert_eq!(code, 0, "{what}: kvtuner-patch {args:?}: {out}{err}");
    out
}

/// Copy `from` (a tree root) into `dest` exactly (modes, links).
fn cp_a(from: &Path, dest: &Path) {
    fs::create_dir_all(dest).unwrap();
    let status = Proc::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(dest)
        .status()
        .unwrap();
    assert!(status.success());
}

fn strace() -> &'static str {
    let ok = Proc::new("strace")
        .arg("-V")
        .output()
        .map(|o| o.status.success());
    assert!(
        matches!(ok, Ok(true)),
        "strace is needed for the crash tests (apt-get install strace)"
    );
    "strace"
}

/// Run the CLI with `args` on `tree` under `strace -f -e EXPR`, its log into `log`.
fn under_strace(log: &Path, expr: &str, args: &[&str], tree: &Path) -> std::process::ExitStatus {
    Proc::new(strace())
        .args(["-f", "-qq", "-o"])
        .arg(log)
        .args(["-e", expr])
        .arg(bin())
        .args(args)
        .arg("--sglang-root")
        .arg(tree)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
}

/// How many times `args` calls each of [`FS_STEPS`] on a copy of `tree` (the copy is used up).
fn count_fs_steps(args: &[&str], tree: &Path) -> BTreeMap<String, usize> {
    let log = tempfile::NamedTempFile::new().unwrap();
    let trace = format!("trace={}", FS_STEPS.join(","));
    let status = under_strace(log.path(), &trace, args, tree);
    assert!(status.success(), "{args:?} under strace failed");
    let mut counts = BTreeMap::new();
    for line in fs::read_to_string(log.path()).unwrap().lines() {
        // "PID name(args) = ret" (with -f) or "name(args) = ret".
        let call = line
            .split_whitespace()
            .find(|w| w.contains('('))
            .unwrap_or("");
        let name = call.split('(').next().unwrap_or("");
        if FS_STEPS.contains(&name) {
            *counts.entry(name.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

/// Run `args` on `tree` and SIGKILL it at the `n`-th call of `syscall`.
fn crash_at(args: &[&str], tree: &Path, syscall: &str, n: usize) {
    let inject = format!("inject={syscall}:signal=SIGKILL:when={n}");
    let status = under_strace(Path::new("/dev/null"), &inject, args, tree);
    assert!(
        !status.success(),
        "{args:?} was not killed at {syscall} #{n}: the step count changed between runs"
    );
}

/// No temporary file of ours is left anywhere in `root` outside the state folder.
fn assert_no_stray_temp_files(root: &Path, context: &str) {
    for e in walkdir::WalkDir::new(root) {
        let e = e.unwrap();
        let rel = e
            .path()
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .to_string();
        let name = e.file_name().to_string_lossy();
        assert!(
            rel.contains(".kvtuner-patch/") || !name.starts_with(".kvtuner-patch-"),
            "{context}: stray temporary file {rel}"
        );
    }
}

/// After a crash: `status` explains, the next `apply` completes (verify accepts the tree) and,
/// from the same crashed state, the next `revert` gives back exactly `pristine`.
fn assert_both_recoveries(crashed: &Path, pristine: &BTreeMap<String, Entry>, context: &str) {
    let (code, out, err) = run_limited(&["status"], crashed, Duration::from_secs(60));
    assert_documented_exit(code, &err, &format!("{context}: status"));
    let crashed_state = full_snapshot(crashed);
    let half_done = crashed_state != *pristine
        && run_limited(&["verify"], crashed, Duration::from_secs(60)).0 != 0;
    if half_done {
        assert!(
            format!("{out}{err}").contains("interrupted"),
            "{context}: status does not say an operation was interrupted: {out}{err}"
        );
    }

    let other = tempfile::tempdir().unwrap();
    cp_a(crashed, other.path());

    ok(
        &["apply"],
        crashed,
        &format!("{context}: apply after the crash"),
    );
    ok(
        &["verify"],
        crashed,
        &format!("{context}: verify after recovery by apply"),
    );
    assert_no_stray_temp_files(crashed, &format!("{context}: after recovery by apply"));

    ok(
        &["revert"],
        other.path(),
        &format!("{context}: revert after the crash"),
    );
    assert_pristine(
        pristine,
        other.path(),
        &format!("{context}: revert after the crash"),
    );
}

/// Kill `command` (run on a copy of `start`) at each of its file-system steps in turn, and
/// check after each crash that both recoveries give `pristine` or a verified tree.
fn crash_at_every_step(command: &str, start: &Path, pristine: &BTreeMap<String, Entry>) {
    let probe = tempfile::tempdir().unwrap();
    cp_a(start, probe.path());
    let counts = count_fs_steps(&[command], probe.path());
    assert!(
        ["rename", "renameat", "renameat2"]
            .iter()
            .any(|r| counts.contains_key(*r)),
        "{command} renamed nothing? {counts:?}"
    );
    for (syscall, &total) in &counts {
        for n in 1..=total {
            let t = tempfile::tempdir().unwrap();
            cp_a(start, t.path());
            crash_at(&[command], t.path(), syscall, n);
            let context = format!("{command} killed at {syscall} #{n}");
            assert_both_recoveries(t.path(), pristine, &context);
        }
    }
}

#[test]
fn apply_crashed_at_every_file_system_step_recovers_both_ways() {
    let fresh = copy_tree(&fixture("sglang-0.5.23"), "");
    crash_at_every_step("apply", fresh.path(), &full_snapshot(fresh.path()));
}

#[test]
fn revert_crashed_at_every_file_system_step_recovers_both_ways() {
    let fresh = copy_tree(&fixture("sglang-0.5.23"), "");
    let pristine = full_snapshot(fresh.path());
    let patched = tempfile::tempdir().unwrap();
    cp_a(fresh.path(), patched.path());
    ok(&["apply"], patched.path(), "apply");
    crash_at_every_step("revert", patched.path(), &pristine);
}

#[test]
fn a_second_writer_waits_or_names_the_holder() {
    let t = copy_tree(&fixture("sglang-0.5.23"), "");
    // The first apply is stopped (SIGSTOP) at its first rename, holding whatever it holds.
    let mut first = Proc::new(strace())
        .args(["-f", "-qq", "-o", "/dev/null"])
        .args([
            "-e",
            "inject=rename,renameat,renameat2:signal=SIGSTOP:when=1",
        ])
        .arg(bin())
        .arg("apply")
        .arg("--sglang-root")
        .arg(t.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the CLI (strace's child) holds a lock: from then on it is the tree's writer,
    // and it stops for good at its first rename.
    let start = Instant::now();
    let stopped_pid = loop {
        let child_pid = fs::read_dir("/proc").unwrap().find_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid: u32 = stat.rsplit(") ").next()?.split(' ').nth(1)?.parse().ok()?;
            (ppid == first.id()).then_some(pid)
        });
        let locks = fs::read_to_string("/proc/locks").unwrap_or_default();
        let holds = |pid: u32| {
            locks.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1) == Some(&"FLOCK") && f.get(4) == Some(&pid.to_string().as_str())
            })
        };
        if let Some(pid) = child_pid.filter(|&p| holds(p)) {
            break pid;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "first apply never took a lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    };

    let mut second = Proc::new(bin())
        .arg("apply")
        .arg("--sglang-root")
        .arg(t.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let waited = second.try_wait().unwrap().is_none();
    let mut second = Some(second);
    if !waited {
        let out = second.take().unwrap().wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            exit_code(&out.status),
            2,
            "second apply while the first holds the tree: {err}"
        );
        assert!(
            err.contains(&stopped_pid.to_string()),
            "the refusal does not name the holder (pid {stopped_pid}): {err}"
        );
    }
    // Let the first one finish.
    Proc::new("kill")
        .args(["-CONT", &stopped_pid.to_string()])
        .status()
        .unwrap();
    let first_out = first.wait().unwrap();
    assert!(first_out.success(), "first apply failed after SIGCONT");
    if let Some(second) = second {
        let out = second.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(exit_code(&out.status), 0, "{text}");
        assert!(
            text.contains("nothing to do"),
            "the waiting apply redid the work: {text}"
        );
    }
    ok(&["verify"], t.path(), "verify after two writers");
}

#[test]
fn concurrent_applies_never_both_claim_the_work() {
    let t = copy_tree(&fixture("sglang-0.5.23"), "");
    let children: Vec<_> = (0..6)
        .map(|_| {
            Proc::new(bin())
                .arg("apply")
                .arg("--sglang-root")
                .arg(t.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut claimed = 0;
    for c in children {
        let out = c.wait_with_output().unwrap();
        let code = exit_code(&out.status);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            code == 0 || code == 2,
            "concurrent apply: exit {code}: {text}"
        );
        if code == 0 && text.starts_with("applied [") {
            claimed += 1;
        }
    }
    assert_eq!(
        claimed, 1,
        "exactly one of the concurrent applies did the work"
    );
    ok(&["verify"], t.path(), "verify after concurrent applies");
}

/// A patched copy of the fixture and the parsed manifest.
fn patched_with_manifest() -> (tempfile::TempDir, PathBuf, serde_json::Value) {
    let t = copy_tree(&fixture("sglang-0.5.23"), "tree");
    ok(&["apply"], &t.path().join("tree"), "apply");
    let path = t.path().join("tree/sglang/.kvtuner-patch/manifest.json");
    let manifest = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    (t, path, manifest)
}

#[test]
fn a_manifest_naming_paths_outside_the_root_is_refused_and_never_acted_on() {
    for hostile in [
        "../../victim.txt",
        "/tmp/kvtuner-victim-absolute.txt",
        "srt/../../../victim.txt",
    ] {
        let (t, path, mut manifest) = patched_with_manifest();
        let root = t.path().join("tree");
        let victim = t.path().join("victim.txt");
        fs::write(&victim, b"precious\n").unwrap();
        // Hashes that match, so that not even --force would be needed to act on it.
        let digest = {
            use sha2::Digest;
            format!("{:x}", sha2::Sha256::digest(b"precious\n"))
        };
        manifest["files"][hostile] = serde_json::json!({
            "created": true, "pre_sha256": null, "post_sha256": digest
        });
        fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
        let before = full_snapshot(t.path());
        for args in [
            &["revert"][..],
            &["revert", "--force"],
            &["apply"],
            &["status"],
            &["verify"],
        ] {
            let (code, out, err) = run_limited(args, &root, Duration::from_secs(60));
            let what = format!("{args:?} with manifest entry {hostile}");
            if args[0] == "status" {
                assert_documented_exit(code, &err, &what);
            } else {
                assert_eq!(code, 2, "{what}: {out}{err}");
                assert!(
                    err.contains(hostile),
                    "{what}: the refusal does not name the entry: {err}"
                );
            }
            assert_pristine(&before, t.path(), &what);
            assert!(victim.exists());
        }
    }
}

#[test]
fn a_manifest_folder_outside_the_root_is_refused() {
    let (t, path, mut manifest) = patched_with_manifest();
    let root = t.path().join("tree");
    fs::create_dir(t.path().join("outside")).unwrap();
    manifest["created_dirs"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!("../../outside"));
    fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    let before = full_snapshot(t.path());
    let (code, _, err) = run_limited(&["revert", "--force"], &root, Duration::from_secs(60));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("../../outside"), "{err}");
    assert_pristine(&before, t.path(), "revert with a folder outside the root");
}

#[test]
fn apply_does_not_carry_unknown_manifest_entries_forward() {
    let (t, path, mut manifest) = patched_with_manifest();
    let root = t.path().join("tree");
    ok(&["revert"], &root, "revert");
    // A manifest left behind with an entry no group makes (inside the root, so not hostile).
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    manifest["files"]["srt/not_ours.py"] =
        serde_json::json!({"created": true, "pre_sha256": null, "post_sha256": "00"});
    fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    let (code, _, err) = run_limited(&["apply"], &root, Duration::from_secs(60));
    assert_documented_exit(code, &err, "apply over a stale manifest");
    if code == 0 {
        let m: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert!(
            m["files"].get("srt/not_ours.py").is_none(),
            "apply carried an unknown manifest entry forward"
        );
    }
}

#[test]
fn revert_on_a_reinstalled_other_release_refuses_naming_both() {
    let t = copy_tree(&fixture("sglang-0.5.23"), "");
    ok(&["apply"], t.path(), "apply");
    // What `pip install sglang==0.5.18 --force-reinstall` does: the release's own files are
    // replaced; ours (state folder, injected package) stay.
    let sglang = t.path().join("sglang");
    for e in fs::read_dir(&sglang).unwrap() {
        let e = e.unwrap();
        if e.file_name() != ".kvtuner-patch" {
            let p = e.path();
            if p.is_dir() {
                // keep the injected package below srt/mem_cache
                let keep = p.join("mem_cache/kvtuner_hicache");
                let kept = tempfile::tempdir().unwrap();
                if keep.exists() {
                    cp_a(&keep, kept.path());
                }
                fs::remove_dir_all(&p).unwrap();
                if kept.path().read_dir().unwrap().next().is_some() {
                    cp_a(kept.path(), &keep);
                }
            } else {
                fs::remove_file(&p).unwrap();
            }
        }
    }
    cp_a(&fixture("sglang-0.5.18"), t.path());
    let before = full_snapshot(t.path());
    for args in [&["revert"][..], &["revert", "--force"]] {
        let (code, out, err) = run_limited(args, t.path(), Duration::from_secs(60));
        assert_eq!(code, 2, "{args:?} on a reinstalled release: {out}{err}");
        assert!(
            err.contains("0.5.23") && err.contains("0.5.18"),
            "{args:?}: the refusal does not name both releases: {err}"
        );
        assert_pristine(
            &before,
            t.path(),
            &format!("{args:?} on a reinstalled release"),
        );
    }
}

#[test]
fn deep_nesting_non_utf8_roots_and_closed_stdout_give_exit_codes_not_crashes() {
    // ~50k nested brackets in a file the structural lookups search.
    let t = copy_tree(&fixture("sglang-0.5.23"), "");
    // It names the classes and functions the anchors look for, so every search parses it.
    let deep = format!(
        "# ServerArgs HiCacheController MHATokenToKVPoolHost get_mha_host_pool_cls\n\
         # StorageBackendFactory run_scheduler_process add_cli_args class def\n\
         x = {}{}\n",
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    for dir in [
        "sglang/srt",
        "sglang/srt/managers",
        "sglang/srt/mem_cache",
        "sglang/srt/mem_cache/storage",
        "sglang/srt/mem_cache/pool_host",
        "sglang/srt/arg_groups",
    ] {
        fs::write(t.path().join(dir).join("deep_nesting.py"), &deep).unwrap();
    }
    // ... and in a file the groups edit.
    let target = t.path().join("sglang/srt/mem_cache/pool_host/mha.py");
    let mut text = fs::read_to_string(&target).unwrap();
    text.push_str(&deep);
    fs::write(&target, text).unwrap();
    for args in [
        &["status"][..],
        &["apply", "--dry-run"],
        &["apply"],
        &["verify"],
        &["revert"],
    ] {
        let (code, _, err) = run_limited(args, t.path(), Duration::from_secs(120));
        assert_documented_exit(code, &err, &format!("{args:?} with deep nesting"));
    }

    // A root whose path is not UTF-8: JSON output stays valid.
    let base = tempfile::tempdir().unwrap();
    let odd = base
        .path()
        .join(std::ffi::OsStr::from_bytes(b"tree-\xff-odd"));
    cp_a(&fixture("sglang-0.5.23"), &odd);
    for args in [
        &["--json", "status"][..],
        &["--json", "apply"],
        &["--json", "verify"],
        &["--json", "revert"],
    ] {
        let (code, out, err) = run_limited(args, &odd, Duration::from_secs(60));
        assert_documented_exit(code, &err, &format!("{args:?} on a non-UTF-8 root"));
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"));
    }

    // stdout closed by the reader (`apply --dry-run | head -1`).
    let t = copy_tree(&fixture("sglang-0.5.23"), "");
    let mut child = Proc::new(bin())
        .args(["apply", "--dry-run", "--sglang-root"])
        .arg(t.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_documented_exit(
        exit_code(&out.status),
        &err,
        "apply --dry-run into a closed pipe",
    );
}

#[test]
fn non_regular_and_oversized_targets_are_refused_without_reading() {
    let target = "sglang/srt/arg_groups/fields/memory.py";
    // A FIFO (reading it would block forever) and a link to /dev/zero (endless).
    for make in ["fifo", "zero"] {
        let t = copy_tree(&fixture("sglang-0.5.23"), "");
        let p = t.path().join(target);
        fs::remove_file(&p).unwrap();
        if make == "fifo" {
            assert!(Proc::new("mkfifo").arg(&p).status().unwrap().success());
        } else {
            std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
        }
        for args in [&["status"][..], &["apply"], &["verify"]] {
            let (code, out, err) = run_limited(args, t.path(), Duration::from_secs(20));
            assert_documented_exit(code, &err, &format!("{args:?} with a {make} target"));
            assert_ne!(code, 0, "{args:?} with a {make} target: {out}{err}");
            assert!(
                format!("{out}{err}").contains("memory.py (is not a regular file")
                    || format!("{out}{err}").contains("memory.py (is a symlink"),
                "{args:?}: the refusal does not say why memory.py was not read: {out}{err}"
            );
        }
    }
    // An oversized target: refused with the limit in the message.
    let t = copy_tree(&fixture("sglang-0.5.23"), "");
    let f = fs::OpenOptions::new()
        .append(true)
        .open(t.path().join(target))
        .unwrap();
    f.set_len(512 << 20).unwrap(); // sparse: costs no disk
    let (code, out, err) = run_limited(&["apply"], t.path(), Duration::from_secs(30));
    assert_documented_exit(code, &err, "apply with an oversized target");
    assert_ne!(code, 0, "oversized target: {out}{err}");
    assert!(err.contains("memory.py") && err.contains("limit"), "{err}");
}

#[test]
fn symlinked_targets_are_kept_and_folders_leaving_the_root_are_refused() {
    // A target file that is a symlink (inside the root).
    let t = copy_tree(&fixture("sglang-0.5.23"), "");
    let dir = t.path().join("sglang/srt/arg_groups/fields");
    fs::rename(dir.join("memory.py"), dir.join("memory_real.py")).unwrap();
    std::os::unix::fs::symlink("memory_real.py", dir.join("memory.py")).unwrap();
    // The link is never written through or replaced: the anchor, looked up by structure, is
    // patched in the regular file the link names, and revert gives back the exact tree.
    let before = full_snapshot(t.path());
    let (code, out, err) = run_limited(&["apply"], t.path(), Duration::from_secs(60));
    assert_eq!(code, 0, "symlinked target: {out}{err}");
    assert!(out.contains("memory_real.py"), "{out}");
    assert_eq!(
        fs::read_link(dir.join("memory.py")).unwrap(),
        PathBuf::from("memory_real.py")
    );
    ok(&["verify"], t.path(), "verify with a symlinked target");
    ok(&["revert"], t.path(), "revert with a symlinked target");
    assert_pristine(&before, t.path(), "revert with a symlinked target");

    // sglang/srt is a symlink to a folder outside the root.
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("root");
    let outside = base.path().join("elsewhere");
    cp_a(&fixture("sglang-0.5.23"), &root);
    fs::rename(root.join("sglang/srt"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("sglang/srt")).unwrap();
    let before = full_snapshot(base.path());
    let before_outside = full_snapshot(&outside);
    let (code, out, err) = run_limited(&["apply"], &root, Duration::from_secs(60));
    assert_eq!(code, 2, "symlink leaving the root: {out}{err}");
    assert!(err.contains("symlink"), "{err}");
    assert_pristine(
        &before_outside,
        &outside,
        "apply through a symlink leaving the root",
    );
    assert_pristine(
        &before,
        base.path(),
        "apply through a symlink leaving the root",
    );
}

/// Run the CLI as user `nobody` (root ignores permission bits).
fn run_as_nobody(args: &[&str], root: &Path) -> (i32, String, String) {
    let out = Proc::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin())
        .args(args)
        .arg("--sglang-root")
        .arg(root)
        .env_remove("KVTUNER_SGLANG_ROOT")
        .output()
        .unwrap();
    (
        exit_code(&out.status),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn an_unwritable_file_or_folder_is_found_before_anything_is_written() {
    let probe = Proc::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "true"])
        .status()
        .unwrap();
    assert!(probe.success(), "setpriv cannot switch to nobody here");
    // Folder the injected package goes into; a file apply edits; the package folder itself
    // (where the state folder goes).
    for locked in [
        "sglang/srt/mem_cache",
        "sglang/srt/arg_groups/fields/memory.py",
        "sglang",
    ] {
        let base = tempfile::tempdir().unwrap();
        fs::set_permissions(base.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let root = base.path().join("tree");
        cp_a(&fixture("sglang-0.5.23"), &root);
        assert!(Proc::new("chown")
            .args(["-R", "65534:65534"])
            .arg(&root)
            .status()
            .unwrap()
            .success());
        let p = root.join(locked);
        std::os::unix::fs::chown(&p, Some(0), Some(0)).unwrap();
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        let before = full_snapshot(&root);
        let (code, out, err) = run_as_nobody(&["apply"], &root);
        assert_eq!(code, 2, "apply with {locked} unwritable: {out}{err}");
        let name = Path::new(locked)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        assert!(
            err.contains(&name),
            "the refusal does not name {locked}: {err}"
        );
        assert_pristine(&before, &root, &format!("apply with {locked} unwritable"));
    }
}

#[test]
fn bom_and_crlf_files_are_patched_in_their_own_encoding_and_reverted_exactly() {
    let target = "sglang/srt/arg_groups/fields/memory.py";
    for style in ["bom", "crlf", "bom+crlf"] {
        let t = copy_tree(&fixture("sglang-0.5.23"), "");
        let p = t.path().join(target);
        let mut text = fs::read(&p).unwrap();
        if style.contains("crlf") {
            text = String::from_utf8(text)
                .unwrap()
                .replace('\n', "\r\n")
                .into_bytes();
        }
        if style.contains("bom") {
            text.splice(0..0, [0xEF, 0xBB, 0xBF]);
        }
        fs::write(&p, &text).unwrap();
        let pristine = full_snapshot(t.path());
        ok(&["apply"], t.path(), style);
        ok(&["verify"], t.path(), style);
        let patched = fs::read(&p).unwrap();
        assert_ne!(patched, text, "{style}: nothing was injected");
        assert_eq!(
            patched.starts_with(&[0xEF, 0xBB, 0xBF]),
            style.contains("bom"),
            "{style}: BOM"
        );
        if style.contains("crlf") {
            let bare_lf = patched
                .windows(2)
                .filter(|w| w[1] == b'\n' && w[0] != b'\r')
                .count()
                + usize::from(patched.first() == Some(&b'\n'));
            assert_eq!(bare_lf, 0, "{style}: LF-only lines mixed into a CRLF file");
        }
        ok(&["revert"], t.path(), style);
        assert_pristine(&pristine, t.path(), &format!("{style}: revert"));
    }
}

#[test]
fn an_unrelated_latin1_file_mentioning_anchor_names_blocks_nothing() {
    let t = copy_tree(&fixture("sglang-0.5.23"), "");
    for dir in [
        "sglang/srt/mem_cache",
        "sglang/srt/mem_cache/pool_host",
        "sglang/srt/arg_groups",
    ] {
        fs::write(
            t.path().join(dir).join("legacy_notes.py"),
            b"# caf\xe9: MHATokenToKVPoolHost get_mha_host_pool_cls HiCacheController\nx = 1\n",
        )
        .unwrap();
    }
    let pristine = full_snapshot(t.path());
    let (code, out, err) = run_limited(&["status"], t.path(), Duration::from_secs(60));
    assert_eq!(code, 1, "status: {out}{err}");
    ok(&["apply"], t.path(), "apply");
    ok(&["verify"], t.path(), "verify");
    ok(&["revert"], t.path(), "revert");
    assert_pristine(&pristine, t.path(), "revert");
}

/// xorshift64*: a tiny deterministic generator (no dependency; the seed is in every message).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One random edit of `text`: what a user, a formatter, another patch or a bad disk might do.
fn mutate(text: &[u8], rng: &mut Rng) -> (String, Vec<u8>) {
    let lines: Vec<&[u8]> = text.split_inclusive(|&b| b == b'\n').collect();
    let i = rng.below(lines.len().max(1));
    let mut out: Vec<u8>;
    let kind = rng.below(8);
    let what = match kind {
        0 => {
            let n = 1 + rng.below(5);
            out = lines
                .iter()
                .enumerate()
                .filter(|(j, _)| *j < i || *j >= i + n)
                .flat_map(|(_, l)| l.to_vec())
                .collect();
            format!("delete lines {i}..{}", i + n)
        }
        1 => {
            out = lines
                .iter()
                .enumerate()
                .flat_map(|(j, l)| {
                    if j == i {
                        [l.to_vec(), l.to_vec()].concat()
                    } else {
                        l.to_vec()
                    }
                })
                .collect();
            format!("duplicate line {i}")
        }
        2 => {
            out = text.to_vec();
            let at = rng.below(out.len().max(1));
            out.insert(at, 0xff);
            format!("invalid UTF-8 byte at {at}")
        }
        3 => {
            out = [&[0xEF, 0xBB, 0xBF][..], text].concat();
            "BOM".into()
        }
        4 => {
            out = String::from_utf8_lossy(text)
                .replace('\n', "\r\n")
                .into_bytes();
            "CRLF".into()
        }
        5 => {
            out = text.to_vec();
            let deep = format!("y = {}{}\n", "(".repeat(30_000), ")".repeat(30_000));
            let at: usize = lines[..i].iter().map(|l| l.len()).sum();
            out.splice(at..at, deep.into_bytes());
            format!("deep nesting before line {i}")
        }
        6 => {
            out = text[..rng.below(text.len().max(1))].to_vec();
            format!("truncated to {} bytes", out.len())
        }
        _ => {
            // Rename an identifier-like word of the chosen line.
            out = lines
                .iter()
                .enumerate()
                .flat_map(|(j, l)| {
                    if j != i {
                        return l.to_vec();
                    }
                    let s = String::from_utf8_lossy(l);
                    match s
                        .split(|c: char| !c.is_alphanumeric() && c != '_')
                        .find(|w| w.len() > 3)
                    {
                        Some(w) => s.replacen(w, &format!("{w}_x"), 1).into_bytes(),
                        None => l.to_vec(),
                    }
                })
                .collect();
            format!("rename a word on line {i}")
        }
    };
    (what, out)
}

#[test]
fn random_edits_of_real_target_files_give_exit_codes_and_all_or_nothing() {
    let base = release_tree("0.5.23");
    let targets = [
        "sglang/srt/arg_groups/fields/memory.py",
        "sglang/srt/arg_groups/hicache_hook.py",
        "sglang/srt/managers/cache_controller.py",
        "sglang/srt/mem_cache/pool_host/mha.py",
        "sglang/srt/mem_cache/storage/backend_factory.py",
        "sglang/srt/server_args.py",
    ];
    let pristine_tree = tempfile::tempdir().unwrap();
    // Only the folders the groups look at: a copy of the whole wheel per case is too slow.
    cp_a(&base, pristine_tree.path());
    let cases: u64 = std::env::var("KVTUNER_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    for seed in 1..=cases {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed);
        let t = tempfile::tempdir().unwrap();
        cp_a(pristine_tree.path(), t.path());
        let mut edits = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let target = targets[rng.below(targets.len())];
            let p = t.path().join(target);
            let (what, text) = mutate(&fs::read(&p).unwrap(), &mut rng);
            fs::write(&p, text).unwrap();
            edits.push(format!("{target}: {what}"));
        }
        let context = format!("seed {seed} ({})", edits.join("; "));
        let before = full_snapshot(t.path());
        for args in [&["status"][..], &["apply", "--dry-run"]] {
            let (code, _, err) = run_limited(args, t.path(), Duration::from_secs(120));
            assert_documented_exit(code, &err, &format!("{context}: {args:?}"));
            assert_pristine(&before, t.path(), &format!("{context}: {args:?} wrote"));
        }
        let (code, _, err) = run_limited(&["apply"], t.path(), Duration::from_secs(120));
        assert_documented_exit(code, &err, &format!("{context}: apply"));
        if code == 0 {
            ok(
                &["verify"],
                t.path(),
                &format!("{context}: verify after apply"),
            );
            ok(&["revert"], t.path(), &format!("{context}: revert"));
            assert_pristine(&before, t.path(), &format!("{context}: revert"));
        } else {
            assert_pristine(
                &before,
                t.path(),
                &format!("{context}: failed apply left changes"),
            );
        }
    }
}
