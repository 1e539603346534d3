//! Host-side bindings of the `quern:handler` world (`wit/handler.wit`).
//!
//! Only `http.send` is async on the host (it waits on the network); the other
//! imports are quick and synchronous. The export is called asynchronously so a
//! running guest can be interrupted at an epoch tick (deadline, cancel).

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
