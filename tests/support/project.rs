//! A temporary Cargo workspace laid out like quern's (members `handlers/*`,
//! quern's `[workspace.dependencies]` by absolute path, quern's profiles and
//! lock file, `cargo xtask` running quern's xtask), building into quern's
//! target directory so only what is new in it is compiled. A handler author's
//! project, for the tests that play one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

pub struct Project {
    dir: tempfile::TempDir,
    target: PathBuf,
}

impl Project {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let repo = Path::new(REPO);
        let manifest: toml::Table = std::fs::read_to_string(repo.join("Cargo.toml")).unwrap().parse().unwrap();
        let workspace = manifest["workspace"].as_table().unwrap();
        let mut dependencies = workspace["dependencies"].as_table().unwrap().clone();
        for (_, spec) in dependencies.iter_mut() {
            if let Some(path) = spec.get_mut("path") {
                *path = toml::Value::String(repo.join(path.as_str().unwrap()).display().to_string());
            }
        }
        let mut root = toml::Table::new();
        root.insert(
            "workspace".into(),
            toml::Value::Table(toml::Table::from_iter([
                ("resolver".to_string(), toml::Value::String("3".into())),
                ("members".to_string(), toml::Value::Array(vec![toml::Value::String("handlers/*".into())])),
                ("package".to_string(), workspace["package"].clone()),
                ("dependencies".to_string(), toml::Value::Table(dependencies)),
                ("lints".to_string(), workspace["lints"].clone()),
            ])),
        );
        // The same profiles, so what quern's build already compiled is reused.
        if let Some(profile) = manifest.get("profile") {
            root.insert("profile".into(), profile.clone());
        }
        std::fs::write(dir.path().join("Cargo.toml"), toml::to_string(&root).unwrap()).unwrap();
        std::fs::copy(repo.join("Cargo.lock"), dir.path().join("Cargo.lock")).unwrap();
        std::fs::create_dir(dir.path().join("handlers")).unwrap();
        // `cargo xtask` as in quern's checkout. Run by its manifest, xtask
        // resolves quern's workspace, not this one: the project's lock file
        // takes in a new crate at its first build, as an author's would.
        let xtask = repo.join("xtask/Cargo.toml");
        std::fs::create_dir(dir.path().join(".cargo")).unwrap();
        std::fs::write(
            dir.path().join(".cargo/config.toml"),
            format!("[alias]\nxtask = \"run --quiet --manifest-path {} --\"\n", xtask.display()),
        )
        .unwrap();
        let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo.join("target"), PathBuf::from);
        Self { dir, target }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// quern's target directory, which the project builds into.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Runs a command in the project; panics with its output when it fails.
    pub fn run(&self, what: &str, command: &mut Command) -> String {
        let output: Output = command
            .current_dir(self.path())
            .env("CARGO_TARGET_DIR", &self.target)
            .output()
            .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        );
        assert!(output.status.success(), "{what} failed ({}):\n{stdout}\n{stderr}", output.status);
        stdout + &stderr
    }

    pub fn quern(&self, args: &[&str]) -> String {
        self.run(&format!("quern {}", args.join(" ")), Command::new(env!("CARGO_BIN_EXE_quern")).args(args))
    }

    pub fn cargo(&self, args: &[&str]) -> String {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        self.run(&format!("cargo {}", args.join(" ")), Command::new(cargo).args(args))
    }
}
