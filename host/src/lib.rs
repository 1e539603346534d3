//! quern: a job host. A durable queue, a result cache, retries and an outbound
//! HTTP client around job handlers that run as sandboxed WebAssembly components.
//!
//! - [`runtime`]: wasmtime, the handler world, host capabilities, hot swap.
//! - [`queue`]: the job lifecycle and the worker; [`store`]: the SQL under it.
//! - [`api`]: the HTTP gateway.
//! - [`manifest`]: `handler.toml`, what a handler may do.
//! - [`config`]: settings from flags and the environment.
//! - [`bench`]: benchmarks that print their numbers.
//! - [`testing`]: run a built handler against canned HTTP responses.

pub mod alerts;
pub mod api;
pub mod bench;
pub mod config;
pub mod manifest;
pub mod queue;
pub mod runtime;
pub mod store;
pub mod telemetry;
pub mod testing;
