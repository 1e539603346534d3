//! Project tasks: `cargo xtask build-handlers`, `cargo xtask test`.
//!
//! A handler is a crate under `handlers/` with a `handler.toml`. Building one
//! compiles it to a wasm32-wasip2 component and places `<type>.wasm` and
//! `<type>.toml` side by side in `handlers-dist/` (fixtures, which must never be
//! deployed, go to `handlers-dist/fixtures/`), which is what quern loads.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

const TARGET: &str = "wasm32-wasip2";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    match args.first().map(String::as_str) {
        Some("build-handlers") => build_handlers(&root),
        Some("test") => {
            build_handlers(&root)?;
            test(&root, &args[1..])
        }
        _ => {
            eprintln!("usage: cargo xtask build-handlers | cargo xtask test [cargo test args]");
            std::process::exit(2);
        }
    }
}

/// Runs every test binary even after one fails (one flake must not hide the
/// state of the rest), passes cargo's output through, and ends with one line
/// of totals over all of them.
fn test(root: &Path, extra: &[String]) -> anyhow::Result<()> {
    let mut command = cargo();
    command
        .current_dir(root)
        .args(["test", "--workspace", "--all-features", "--locked", "--no-fail-fast"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().with_context(|| format!("cannot start {command:?}"))?;
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let out = std::thread::spawn(move || stdout.map(|s| tally(s, std::io::stdout())).unwrap_or_default());
    let err = std::thread::spawn(move || stderr.map(|s| tally(s, std::io::stderr())).unwrap_or_default());
    let status = child.wait()?;
    let mut totals = out.join().unwrap_or_default();
    totals.add(err.join().unwrap_or_default());
    // A binary that crashed or hung up printed no result line of its own:
    // it counts as one failure, so the totals never read as a pass.
    let unreported = totals.failed_binaries.len().saturating_sub(totals.failed_results);
    let failed = totals.failed + unreported;
    println!();
    if !totals.failed_binaries.is_empty() {
        println!("failed test binaries: {}", totals.failed_binaries.join(", "));
    }
    if !status.success() && failed == 0 {
        bail!("cargo test failed with {status} before any test failed (a build error?)");
    }
    println!("total: {} passed, {failed} failed, {} skipped", totals.passed, totals.ignored);
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

/// What cargo test's output says, summed over its test binaries.
#[derive(Default)]
struct Totals {
    passed: usize,
    failed: usize,
    ignored: usize,
    /// Result lines that said FAILED.
    failed_results: usize,
    /// How cargo names each binary that failed (`--test gateway`).
    failed_binaries: Vec<String>,
}

impl Totals {
    fn add(&mut self, other: Totals) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
        self.failed_results += other.failed_results;
        self.failed_binaries.extend(other.failed_binaries);
    }

    /// `test result: ok. 10 passed; 0 failed; 1 ignored; …` and
    /// `error: test failed, to rerun pass `--test gateway``.
    fn read(&mut self, line: &str) {
        if let Some(result) = line.strip_prefix("test result: ") {
            self.failed_results += usize::from(result.starts_with("FAILED"));
            for part in result.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(count)) = (words.next(), words.next()) else { continue };
                let Ok(count) = count.parse::<usize>() else { continue };
                match what {
                    "passed" => self.passed += count,
                    "failed" => self.failed += count,
                    "ignored" => self.ignored += count,
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("error: test failed, to rerun pass ") {
            self.failed_binaries.push(rest.trim_matches('`').to_string());
        }
    }
}

/// Copies `from` to `to` line by line while reading each line into totals.
fn tally(from: impl Read, mut to: impl Write) -> Totals {
    let mut totals = Totals::default();
    let mut reader = BufReader::new(from);
    let mut line = Vec::new();
    while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
        let _ = to.write_all(&line);
        let _ = to.flush();
        totals.read(String::from_utf8_lossy(&line).trim_end());
        line.clear();
    }
    totals
}

struct HandlerCrate {
    dir: PathBuf,
    package: String,
    job_type: String,
    fixture: bool,
}

fn build_handlers(root: &Path) -> anyhow::Result<()> {
    let handlers = find_handlers(&root.join("handlers"))?;
    if handlers.is_empty() {
        bail!("no handler crates (a directory with Cargo.toml and handler.toml) under handlers/");
    }
    let mut command = cargo();
    command.current_dir(root).args(["build", "--release", "--target", TARGET]);
    for handler in &handlers {
        command.args(["--package", &handler.package]);
    }
    run(&mut command).with_context(|| {
        format!("building the handlers failed (is the target installed? rustup target add {TARGET})")
    })?;

    let built = target_dir(root).join(TARGET).join("release");
    let dist = root.join("handlers-dist");
    for handler in &handlers {
        let out_dir = if handler.fixture { dist.join("fixtures") } else { dist.clone() };
        std::fs::create_dir_all(&out_dir)?;
        let wasm = built.join(format!("{}.wasm", handler.package.replace('-', "_")));
        copy_atomically(&wasm, &out_dir.join(format!("{}.wasm", handler.job_type)))?;
        copy_atomically(&handler.dir.join("handler.toml"), &out_dir.join(format!("{}.toml", handler.job_type)))?;
        eprintln!("  {} -> {}", handler.job_type, out_dir.join(format!("{}.wasm", handler.job_type)).display());
    }
    Ok(())
}

/// Copies via a temporary file and a rename, so a watching quern never sees a
/// half-written component.
fn copy_atomically(from: &Path, to: &Path) -> anyhow::Result<()> {
    let temp = to.with_extension("partial");
    std::fs::copy(from, &temp).with_context(|| format!("cannot copy {}", from.display()))?;
    std::fs::rename(&temp, to)?;
    Ok(())
}

fn find_handlers(dir: &Path) -> anyhow::Result<Vec<HandlerCrate>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if !path.is_dir() {
            continue;
        }
        if path.join("handler.toml").exists() && path.join("Cargo.toml").exists() {
            found.push(HandlerCrate {
                package: toml_string(&path.join("Cargo.toml"), "name")?,
                job_type: toml_string(&path.join("handler.toml"), "type")?,
                fixture: path.components().any(|c| c.as_os_str() == "fixtures"),
                dir: path,
            });
        } else {
            found.extend(find_handlers(&path)?);
        }
    }
    found.sort_by(|a, b| a.dir.cmp(&b.dir));
    Ok(found)
}

/// The first `key = "value"` line of a TOML file (enough for `name` and `type`).
fn toml_string(path: &Path, key: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .filter_map(|line| line.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
        .with_context(|| format!("{} has no `{key} = \"…\"` line", path.display()))
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command.status().with_context(|| format!("cannot start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

/// The workspace the command runs in: the nearest directory at or above the
/// current one whose Cargo.toml has a `[workspace]` (so a project laid out
/// like quern's can run this xtask on its own handlers), else quern's own.
fn workspace_root() -> PathBuf {
    let is_root = |dir: &Path| {
        std::fs::read_to_string(dir.join("Cargo.toml"))
            .is_ok_and(|text| text.lines().any(|l| l.trim() == "[workspace]"))
    };
    std::env::current_dir()
        .ok()
        .and_then(|cwd| cwd.ancestors().find(|dir| is_root(dir)).map(Path::to_path_buf))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default())
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_result_lines_and_count_a_binary_that_printed_none() {
        let output = "\
running 3 tests
test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s
test result: FAILED. 9 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 4.20s
error: test failed, to rerun pass `--test gateway`
error: test failed, to rerun pass `--test chaos`
";
        let totals = tally(output.as_bytes(), std::io::sink());
        assert_eq!((totals.passed, totals.failed, totals.ignored), (12, 2, 1));
        assert_eq!(totals.failed_binaries, ["--test gateway", "--test chaos"]);
        // `chaos` crashed before its result line: one more failure than lines say.
        assert_eq!(totals.failed_binaries.len() - totals.failed_results, 1);
    }
}
