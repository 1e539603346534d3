//! Project tasks: `cargo xtask build-handlers`, `cargo xtask test`.
//!
//! A handler is a crate under `handlers/` with a `handler.toml`. Building one
//! compiles it to a wasm32-wasip2 component and places `<type>.wasm` and
//! `<type>.toml` side by side in `handlers-dist/` (fixtures, which must never be
//! deployed, go to `handlers-dist/fixtures/`), which is what quern loads.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

const TARGET: &str = "wasm32-wasip2";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    match args.first().map(String::as_str) {
        Some("build-handlers") => build_handlers(&root),
        Some("test") => {
            build_handlers(&root)?;
            let mut command = cargo();
            command.current_dir(&root).args(["test", "--workspace", "--all-features", "--locked"]).args(&args[1..]);
            run(&mut command)
        }
        _ => {
            eprintln!("usage: cargo xtask build-handlers | cargo xtask test [cargo test args]");
            std::process::exit(2);
        }
    }
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
