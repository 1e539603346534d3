//! Logging into the host's log, tagged by the host with the job id, type and
//! handler version. `println!`/`eprintln!` also reach the log, less structured.

#[doc(hidden)]
pub fn write(level: &str, message: &str) {
    crate::bindings::quern::handler::host::log(level, message);
}

/// Logs at debug level: `quern_sdk::debug!("parsed {} items", n)`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log_at("debug", &::std::format!($($arg)*)) };
}

/// Logs at info level.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log_at("info", &::std::format!($($arg)*)) };
}

/// Logs at warn level.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log_at("warn", &::std::format!($($arg)*)) };
}

/// Logs at error level.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log_at("error", &::std::format!($($arg)*)) };
}
