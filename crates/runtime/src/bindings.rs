//! Host-side bindings of the `quern:handler` worlds this host runs: 0.2
//! (`wit/handler.wit`, what handlers are built against today) and 0.1
//! (`wit/0.1/handler.wit`, kept so components built before 0.2 keep running;
//! see `compat_v0_1`). Both are linked into one linker: their interfaces are
//! on different semver tracks, so a component's imports pick its world.
//!
//! Only `http.send` is async on the host (it waits on the network); the other
//! imports are quick and synchronous. The export is called asynchronously so a
//! running guest can be interrupted at an epoch tick (deadline, cancel).

pub mod v0_2 {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "quern:handler/handler",
        imports: {
            "quern:handler/http.send": async,
        },
        exports: {
            default: async,
        },
    });
}

pub mod v0_1 {
    wasmtime::component::bindgen!({
        path: "../../wit/0.1",
        world: "quern:handler/handler",
        imports: {
            "quern:handler/http.send": async,
        },
        exports: {
            default: async,
        },
    });
}

pub use v0_2::quern::handler::host::Level;
pub use v0_2::quern::handler::http::Method;
pub use v0_2::quern::handler::types::{Failure, Job};

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trace => "trace",
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }
}

impl Method {
    /// The method's name as sent on the wire (`other` as given).
    pub fn as_str(&self) -> &str {
        match self {
            Self::Get => "GET",
            Self::Head => "HEAD",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
            Self::Patch => "PATCH",
            Self::Options => "OPTIONS",
            Self::Other(name) => name,
        }
    }
}
