//! The worlds this host runs, and a component linked against the one it was
//! built for: 0.2 natively, 0.1 through `compat_v0_1` (docs/wit-versions.md).

use wasmtime::Store;
use wasmtime::component::{HasSelf, InstancePre, Linker};

use super::LoadError;
use super::bindings::{Failure, Job, v0_1, v0_2};
use super::compat_v0_1;
use super::state::JobState;

/// The world handlers are built against today, as they name it.
pub const WORLD: &str = "quern:handler/handler@0.2.0";

/// Every world this host runs, newest first: a component built against any
/// 0.1.x or 0.2.x release of the WIT loads (docs/wit-versions.md).
pub const WORLDS: [&str; 2] = [WORLD, "quern:handler/handler@0.1.0"];

/// WASI 0.2 and the imports of every world this host runs, in one linker:
/// their interfaces are on different semver tracks, so they do not collide.
pub(super) fn add_to_linker(linker: &mut Linker<JobState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_async(linker)?;
    v0_2::Handler::add_to_linker::<JobState, HasSelf<JobState>>(linker, |state| state)?;
    v0_1::Handler::add_to_linker::<JobState, HasSelf<JobState>>(linker, |state| state)
}

/// A component linked against the world it was built for.
pub(super) enum Pre {
    V0_2(v0_2::HandlerPre<JobState>),
    V0_1(v0_1::HandlerPre<JobState>),
}

impl Pre {
    /// Tries the newest world first. A component that imports nothing of
    /// quern's is told apart by its export alone (0.2's `job` has a deadline).
    pub(super) fn new(instance_pre: InstancePre<JobState>) -> Result<Self, LoadError> {
        let newest = match v0_2::HandlerPre::new(instance_pre.clone()) {
            Ok(pre) => return Ok(Self::V0_2(pre)),
            Err(error) => error,
        };
        let imports_v0_1 = instance_pre
            .component()
            .component_type()
            .imports(instance_pre.component().engine())
            .any(|(name, _)| name.starts_with("quern:handler/") && name.contains("@0.1."));
        match v0_1::HandlerPre::new(instance_pre) {
            Ok(pre) => Ok(Self::V0_1(pre)),
            Err(error) if imports_v0_1 => Err(world_mismatch(error)),
            Err(_) => Err(world_mismatch(newest)),
        }
    }

    pub(super) fn world(&self) -> &'static str {
        match self {
            Self::V0_2(_) => WORLDS[0],
            Self::V0_1(_) => WORLDS[1],
        }
    }

    /// Instantiates the component in `store` and runs `handle` on `job`,
    /// as the world it was built for names them.
    pub(super) async fn call(
        &self,
        store: &mut Store<JobState>,
        job: &Job,
    ) -> wasmtime::Result<Result<String, Failure>> {
        match self {
            Self::V0_2(pre) => {
                let instance = pre.instantiate_async(&mut *store).await?;
                instance.call_handle(store, job).await
            }
            Self::V0_1(pre) => {
                let instance = pre.instantiate_async(&mut *store).await?;
                let ended = instance.call_handle(store, &compat_v0_1::job(job)).await?;
                Ok(ended.map_err(compat_v0_1::failure))
            }
        }
    }
}

pub(super) fn world_mismatch(error: wasmtime::Error) -> LoadError {
    LoadError::WorldMismatch(format!(
        "the component does not fit the worlds this host runs ({}): {error:#} (a handler exports `handle` and imports only quern:handler and WASI 0.2 interfaces; \
         build it against wit/handler.wit, {WORLD})",
        WORLDS.join(", ")
    ))
}
