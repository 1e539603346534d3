//! The `quern` binary's own library: what the command line needs beyond the
//! layers it assembles.
//!
//! - [`config`]: settings from flags and the environment, the one source of
//!   defaults, turned into each layer's settings.
//! - [`bench`] (feature `bench`): benchmarks that print their numbers.
//!
//! The layers are crates of their own (see ARCHITECTURE.md): `quern-runtime`
//! (the sandbox), `quern-store` (the SQL), `quern-queue` (the job lifecycle)
//! and `quern-api` (the HTTP gateway).

#[cfg(feature = "bench")]
pub mod bench;
pub mod config;
