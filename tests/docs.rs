//! Every ```sh block of the guides in `docs/` runs here, so a guide cannot
//! drift from the code: a guide's blocks run in order as one bash script
//! (`set -euo pipefail`: any failing command fails the test), with the
//! `quern` under test first on the `PATH`, a data directory and a free `PORT`
//! of their own, and anything the script left running stopped at its end.
//! A guide about writing a handler runs in a new project laid out like
//! quern's; the others in quern's checkout, with the handlers it built.
//! Examples meant to be read, not run (output, other languages), are fenced
//! as `text`, `toml`, `rust`, `js`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::project::{Project, REPO};

/// Guides whose commands start from an empty project, not quern's checkout.
const IN_A_NEW_PROJECT: &[&str] = &["writing-handlers.md"];

/// The ```sh blocks of a Markdown text, in order.
fn sh_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match current.as_mut() {
            None if line.trim_start() == "```sh" => current = Some(String::new()),
            None => {}
            Some(_) if line.trim_start().starts_with("```") => blocks.extend(current.take()),
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    assert!(current.is_none(), "a ```sh block is never closed");
    blocks
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs a guide's blocks as one script in `dir`; panics with its output and
/// the script when a command fails.
fn run_guide(name: &str, blocks: &[String], dir: &Path, target: Option<&Path>) {
    let quern = PathBuf::from(env!("CARGO_BIN_EXE_quern"));
    let path = format!("{}:{}", quern.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    let data = tempfile::tempdir().unwrap();
    let script = format!(
        "set -euo pipefail\n\
         # What the guide started in the background stops with it.\n\
         trap 'jobs -p | xargs -r kill; wait' EXIT\n\
         {}",
        blocks.join("")
    );
    let mut command = Command::new("timeout");
    command
        .args(["600", "bash", "-c", &script])
        .current_dir(dir)
        .env("PATH", path)
        .env("PORT", free_port().to_string())
        .env("QUERN_DATA_DIR", data.path())
        // Components compiled once for every test run, not once per guide.
        .env("QUERN_CACHE_DIR", support::cache_dir())
        .env("QUERN_LOG", "warn")
        .env_remove("DATABASE_URL")
        .env_remove("QUERN_URL")
        .env_remove("QUERN_TOKEN");
    if let Some(target) = target {
        command.env("CARGO_TARGET_DIR", target);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "docs/{name}: its commands failed ({}):\n--- stdout\n{}\n--- stderr\n{}\n--- script\n{script}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    eprintln!("docs/{name}: {} blocks ran", blocks.len());
}

#[test]
fn every_command_in_the_guides_runs() {
    let docs = Path::new(REPO).join("docs");
    let mut guides: Vec<PathBuf> = std::fs::read_dir(&docs)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    guides.sort();
    let mut ran = 0;
    for guide in &guides {
        let name = guide.file_name().unwrap().to_string_lossy().into_owned();
        let blocks = sh_blocks(&std::fs::read_to_string(guide).unwrap());
        if blocks.is_empty() {
            continue;
        }
        if IN_A_NEW_PROJECT.contains(&name.as_str()) {
            let project = Project::new();
            run_guide(&name, &blocks, project.path(), Some(project.target()));
        } else {
            run_guide(&name, &blocks, Path::new(REPO), None);
        }
        ran += 1;
    }
    for name in IN_A_NEW_PROJECT {
        assert!(guides.iter().any(|g| g.ends_with(name)), "docs/{name} is gone: update IN_A_NEW_PROJECT");
    }
    assert!(ran >= 4, "only {ran} guides have commands: is docs/ there?");
}

#[test]
fn sh_blocks_are_found_in_order_and_other_fences_are_not() {
    let text = "intro\n```sh\necho one\n```\n```text\nnot run\n```\n  ```sh\necho two\nls\n  ```\n";
    assert_eq!(sh_blocks(text), vec!["echo one\n".to_string(), "echo two\nls\n".to_string()]);
}
