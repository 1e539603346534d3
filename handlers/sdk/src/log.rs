//! Logging into the host's log, tagged by the host with the job id, type and
//! handler version. `println!`/`eprintln!` also reach the log, less structured.
//!
//! The SDK's macros (`quern_sdk::info!`, …) and the `log` crate both end here:
//! [`export_handler!`](crate::export_handler) installs a `log` backend, so a
//! dependency that logs through `log` reaches the host's log too.

use crate::Level;

#[doc(hidden)]
pub fn write(level: Level, message: &str) {
    crate::bindings::quern::handler::host::log(level, message);
}

/// Forwards `log` records to the host, prefixed with their target when it is
/// not the handler's own crate (so a dependency's line says whose it is).
struct HostLogger {
    /// The handler crate's name, as a target starts with it.
    own_crate: &'static str,
}

impl log::Log for HostLogger {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = match record.level() {
            log::Level::Error => Level::Error,
            log::Level::Warn => Level::Warn,
            log::Level::Info => Level::Info,
            log::Level::Debug => Level::Debug,
            log::Level::Trace => Level::Trace,
        };
        let target = record.target();
        let crate_name = target.split("::").next().unwrap_or_default();
        if crate_name == self.own_crate || target.is_empty() {
            write(level, &record.args().to_string());
        } else {
            write(level, &format!("{target}: {}", record.args()));
        }
    }

    fn flush(&self) {}
}

static LOGGER: std::sync::OnceLock<HostLogger> = std::sync::OnceLock::new();

/// Makes the host the `log` crate's backend (once per instance; later calls
/// do nothing). Debug and above cross into the host, which filters by its own
/// level; trace stays in the guest unless `log::set_max_level` raises it.
#[doc(hidden)]
pub fn install(own_crate: &'static str) {
    if log::set_logger(LOGGER.get_or_init(|| HostLogger { own_crate })).is_ok() {
        log::set_max_level(log::LevelFilter::Debug);
    }
}

/// Logs at debug level: `quern_sdk::debug!("parsed {} items", n)`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log_at($crate::Level::Debug, &::std::format!($($arg)*)) };
}

/// Logs at info level.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log_at($crate::Level::Info, &::std::format!($($arg)*)) };
}

/// Logs at warn level.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log_at($crate::Level::Warn, &::std::format!($($arg)*)) };
}

/// Logs at error level.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log_at($crate::Level::Error, &::std::format!($($arg)*)) };
}
