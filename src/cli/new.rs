//! `quern new <type>`: scaffolds a handler crate under `handlers/`, ready for
//! `cargo test -p <type>`, `cargo xtask build-handlers` and `quern run`.
//!
//! The templates (`new/*.tmpl`) are whole files with `{{type}}` and `{{Type}}`
//! standing for the job type and its handler's Rust name, so what an author
//! starts from can be read as it is.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use quern_runtime::manifest::validate_job_type;

#[derive(clap::Args, Debug)]
pub struct NewArgs {
    /// The job type, and the crate's name: lowercase letters, digits and `_`, starting with a letter.
    job_type: String,
    /// `plain`: typed input in, typed output out. `http`: calls an allowed
    /// upstream, tested against a canned response.
    #[arg(long, default_value = "plain", value_parser = ["plain", "http"])]
    template: String,
    /// The directory the crate is created in, as `<dir>/<type>`; the workspace's
    /// `members` must cover it (quern's: `handlers/*`).
    #[arg(long, default_value = "handlers")]
    dir: PathBuf,
}

struct Template {
    path: &'static str,
    text: &'static str,
}

const PLAIN: &[Template] = &[
    Template { path: "Cargo.toml", text: include_str!("new/Cargo.toml.tmpl") },
    Template { path: "handler.toml", text: include_str!("new/handler.toml.tmpl") },
    Template { path: "src/lib.rs", text: include_str!("new/lib.rs.tmpl") },
    Template { path: "tests/component.rs", text: include_str!("new/component.rs.tmpl") },
];

const HTTP: &[Template] = &[
    Template { path: "Cargo.toml", text: include_str!("new/Cargo.toml.tmpl") },
    Template { path: "handler.toml", text: include_str!("new/handler_http.toml.tmpl") },
    Template { path: "src/lib.rs", text: include_str!("new/lib_http.rs.tmpl") },
    Template { path: "tests/component.rs", text: include_str!("new/component_http.rs.tmpl") },
];

pub fn new(args: NewArgs) -> anyhow::Result<ExitCode> {
    validate_job_type(&args.job_type).map_err(|error| anyhow::anyhow!("{error}"))?;
    let workspace = workspace_root(&std::env::current_dir()?).context(
        "quern new writes a crate into a Cargo workspace laid out like quern's (its [workspace.dependencies] name \
         quern-sdk and quern-testing): run it at the root of one",
    )?;
    let crate_dir = args.dir.join(&args.job_type);
    if crate_dir.exists() {
        bail!("{} already exists: choose another type name, or remove it first", crate_dir.display());
    }
    let templates = if args.template == "http" { HTTP } else { PLAIN };
    let lints = has_workspace_lints(&workspace);
    for template in templates {
        let path = crate_dir.join(template.path);
        std::fs::create_dir_all(path.parent().unwrap_or(&crate_dir))?;
        let mut text = fill(template.text, &args.job_type);
        if template.path == "Cargo.toml" && lints {
            text.push_str(WORKSPACE_LINTS);
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!("created {} ({} template)", crate_dir.display(), args.template);
    if !covered_by_members(&workspace, &crate_dir) {
        println!(
            "note: {} does not list it among [workspace] members; add \"{}/*\" there",
            workspace.join("Cargo.toml").display(),
            args.dir.display()
        );
    }
    let t = &args.job_type;
    let input = if args.template == "http" { r#"{"city": "Lisbon"}"# } else { r#"{"name": "Ana"}"# };
    println!("next:");
    println!("  cargo xtask build-handlers       # builds handlers-dist/{t}.wasm beside {t}.toml");
    println!("  cargo test -p {t}                # its unit tests, then the built component in the harness");
    println!("  quern run handlers-dist/{t}.wasm --input '{input}'");
    println!("  quern handlers push handlers-dist/{t}.wasm   # to a running quern (QUERN_URL, QUERN_TOKEN)");
    Ok(ExitCode::SUCCESS)
}

/// A template with its placeholders filled.
fn fill(template: &str, job_type: &str) -> String {
    template.replace("{{type}}", job_type).replace("{{Type}}", &rust_name(job_type))
}

/// `meal_plan` → `MealPlan`: the handler's type name.
fn rust_name(job_type: &str) -> String {
    job_type
        .split('_')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map(|first| first.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
        })
        .collect()
}

/// The nearest directory at or above `start` whose Cargo.toml has a `[workspace]`.
fn workspace_root(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|dir| {
            std::fs::read_to_string(dir.join("Cargo.toml"))
                .is_ok_and(|text| text.lines().any(|l| l.trim() == "[workspace]"))
        })
        .map(Path::to_path_buf)
}

/// Appended to a new crate's Cargo.toml in a workspace that has lints.
const WORKSPACE_LINTS: &str =
    "\n# The workspace's lints (CI runs clippy with warnings as errors).\n[lints]\nworkspace = true\n";

/// Whether the workspace sets `[workspace.lints]`, which a member may only
/// inherit when it exists.
fn has_workspace_lints(workspace: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(workspace.join("Cargo.toml")) else { return false };
    text.parse::<toml::Table>().ok().and_then(|manifest| manifest.get("workspace")?.get("lints").cloned()).is_some()
}

/// Whether the workspace's `members` name the crate or a `<dir>/*` glob over it.
fn covered_by_members(workspace: &Path, crate_dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(workspace.join("Cargo.toml")) else { return false };
    let Ok(manifest) = text.parse::<toml::Table>() else { return false };
    let members = manifest.get("workspace").and_then(|w| w.get("members")).and_then(|m| m.as_array());
    let relative = std::env::current_dir().map(|cwd| cwd.join(crate_dir)).ok();
    let relative = relative.as_deref().and_then(|dir| dir.strip_prefix(workspace).ok()).map(Path::to_path_buf);
    let Some(relative) = relative else { return false };
    members.into_iter().flatten().filter_map(|m| m.as_str()).any(|member| match member.strip_suffix("/*") {
        Some(parent) => relative.parent() == Some(Path::new(parent)),
        None => relative == Path::new(member),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_type_becomes_a_rust_type_name() {
        assert_eq!(rust_name("demo"), "Demo");
        assert_eq!(rust_name("meal_plan"), "MealPlan");
        assert_eq!(rust_name("v2_thing"), "V2Thing");
    }

    #[test]
    fn every_placeholder_is_filled() {
        for template in PLAIN.iter().chain(HTTP) {
            let filled = fill(template.text, "meal_plan");
            for placeholder in ["{{type}}", "{{Type}}"] {
                assert!(!filled.contains(placeholder), "{}: {placeholder}", template.path);
            }
        }
    }
}
