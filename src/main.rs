//! Command-line front door: parse arguments, call `commands`, print the report each command
//! renders (text or JSON), exit with the documented code (`refusal::Failure` for errors).

use clap::{Args, Parser, Subcommand};
use kvtuner_patch::commands::{self, Report, Text};
use kvtuner_patch::engine::python::Python;
use kvtuner_patch::groups;
use kvtuner_patch::refusal::{Failure, EXIT_OK};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;

/// The first error writing stdout, other than a reader that went away.
static STDOUT_ERROR: OnceLock<String> = OnceLock::new();

/// Write to stdout. A closed pipe (`apply --dry-run | head -1`) is not our error: the rest of
/// the output is dropped and the exit code stays what the command decided. Any other write
/// error turns a clean exit into exit 2.
fn emit(args: std::fmt::Arguments, newline: bool) {
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|()| {
        if newline {
            out.write_all(b"\n")
        } else {
            Ok(())
        }
    });
    if let Err(e) = written {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            let _ = STDOUT_ERROR.set(e.to_string());
        }
    }
}

macro_rules! say {
    ($($arg:tt)*) => { emit(format_args!($($arg)*), true) };
}

macro_rules! say_raw {
    ($($arg:tt)*) => { emit(format_args!($($arg)*), false) };
}

const AFTER_HELP: &str = "\
Exit codes:
  0  done / clean (applied, verified, reverted, nothing to do)
  1  not applied, drift (an anchor not found exactly once, a hand-edited block,
     a file edited since apply) or differences (`diff` printed something)
  2  error (bad arguments, unsupported SGLang release, a patched file that would
     not parse or compile, I/O, Python interpreter missing)

Typical session:
  kvtuner-patch status --sglang-root ~/src/sglang       # what release, what is applied
  kvtuner-patch diff   --sglang-root ~/src/sglang       # see the change first
  kvtuner-patch apply  --sglang-root ~/src/sglang       # all groups, all-or-nothing
  kvtuner-patch verify --sglang-root ~/src/sglang --python ~/venv/bin/python
  kvtuner-patch revert --sglang-root ~/src/sglang       # back to the exact original bytes

--sglang-root may be a git checkout (holding python/sglang), its python/ folder,
or a folder holding an installed or unpacked `sglang/` package (site-packages).
Nothing is ever half-written: every change is planned in memory, parsed and
compiled, and only then written as one journaled transaction; a crash at any
point is rolled back by the next apply or revert. One writer at a time. The
manifest used by `revert` lives in sglang/.kvtuner-patch/.";

/// Add KVTuner quantized HiCache support to an SGLang tree, check it, and take it out again.
#[derive(Parser)]
#[command(name = "kvtuner-patch", version, about, after_help = AFTER_HELP)]
struct Cli {
    /// Print a machine-readable JSON report on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Root {
    /// SGLang tree: git checkout, its python/ folder, or a folder holding `sglang/`.
    #[arg(long, value_name = "DIR", env = "KVTUNER_SGLANG_ROOT")]
    sglang_root: PathBuf,
}

#[derive(Args)]
struct Only {
    // The help lists the registered groups (`groups::only_help`).
    #[arg(long, value_name = "GROUP", help = groups::only_help())]
    only: Vec<String>,
}

#[derive(Args)]
struct Interp {
    /// Python interpreter used to compile patched files (default: $KVTUNER_PYTHON, then python3).
    #[arg(long, value_name = "PATH")]
    python: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Apply patch groups (all, or --only GROUP). A second apply changes nothing.
    Apply {
        #[command(flatten)]
        root: Root,
        #[command(flatten)]
        only: Only,
        /// Print the unified diff that apply would make, write nothing (exit 0).
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        python: Interp,
    },
    /// Print the unified diff `apply` would make (git `a/` `b/` headers; `git apply` accepts it).
    /// Exit 1 if there is a difference, 0 if already applied.
    Diff {
        #[command(flatten)]
        root: Root,
        #[command(flatten)]
        only: Only,
        #[command(flatten)]
        python: Interp,
    },
    /// Check every group is applied and intact and every touched file parses and compiles.
    /// With --python, also that this interpreter can `import kvtuner_quant`.
    Verify {
        #[command(flatten)]
        root: Root,
        #[command(flatten)]
        only: Only,
        /// Interpreter to compile with and to check `import kvtuner_quant` in (e.g. your SGLang venv's python).
        #[arg(long, value_name = "PATH")]
        python: Option<PathBuf>,
    },
    /// Restore the tree to its exact pre-apply bytes. Refuses, naming the file, if a patched
    /// file was edited since apply.
    Revert {
        #[command(flatten)]
        root: Root,
        /// Restore the originals even over files edited since apply.
        #[arg(long)]
        force: bool,
    },
    /// Per group: applied, not applied or drifted; the SGLang release and era; whether supported.
    Status {
        #[command(flatten)]
        root: Root,
        #[command(flatten)]
        only: Only,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    let code = match run(cli.command, json) {
        Ok(code) => code,
        Err(err) => {
            let failure = Failure::of(&err);
            if json {
                print_json(&serde_json::json!({
                    "ok": false,
                    "exit_code": failure.exit_code,
                    "error": failure.message,
                    "problems": failure.problems,
                }));
            } else {
                eprintln!("error: {}", failure.text);
            }
            failure.exit_code
        }
    };
    let code = match (STDOUT_ERROR.get(), std::io::stdout().flush()) {
        (Some(e), _) if code == EXIT_OK => {
            eprintln!("error: writing the output failed: {e}");
            2
        }
        (None, Err(e)) if code == EXIT_OK && e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("error: writing the output failed: {e}");
            2
        }
        _ => code,
    };
    ExitCode::from(code as u8)
}

fn print_json<T: Serialize>(v: &T) {
    say!(
        "{}",
        serde_json::to_string_pretty(v).expect("reports serialise")
    );
}

/// Run the command and print its report; its exit code.
fn run(command: Command, json: bool) -> anyhow::Result<i32> {
    let code = match command {
        Command::Status { root, only } => {
            print(commands::status(&root.sglang_root, &only.only)?, json)
        }
        Command::Apply {
            root,
            only,
            dry_run,
            python,
        } => print(
            commands::apply(
                &root.sglang_root,
                &only.only,
                &Python::pick(python.python),
                !dry_run,
            )?,
            json,
        ),
        Command::Diff { root, only, python } => print(
            commands::diff(&root.sglang_root, &only.only, &Python::pick(python.python))?,
            json,
        ),
        Command::Verify { root, only, python } => {
            let check_import = python.is_some();
            print(
                commands::verify(
                    &root.sglang_root,
                    &only.only,
                    &Python::pick(python),
                    check_import,
                )?,
                json,
            )
        }
        Command::Revert { root, force } => print(commands::revert(&root.sglang_root, force)?, json),
    };
    Ok(code)
}

/// Print a command's report, as JSON or as text; its exit code. An interrupted operation
/// rolled back first is said on stderr: stdout stays the report.
fn print(report: impl Report, json: bool) -> i32 {
    if let Some(r) = report.recovered() {
        eprintln!("note: {r}; rolled back first");
    }
    if json {
        print_json(&report.envelope());
    } else {
        let mut text = Text::default();
        report.render(&mut text);
        say_raw!("{}", text.stdout);
        eprint!("{}", text.stderr);
    }
    report.exit_code()
}
