//! The Wasm floor for Sluice's benchmarks: a proxy-wasm HTTP filter that
//! does nothing. Same SDK (proxy-wasm 0.2.5), same ABI (0.2.1), same build
//! profile (release: LTO, panic=abort, strip) and the same context structure
//! as Sluice (a root context that creates one HTTP context per stream), so
//! the difference between the two is Sluice's own logic and host calls, not
//! the SDK's dispatch or the runtime's per-callback cost.
//!
//! ```sh
//! cargo build --release --target wasm32-wasip1 -p sluice-passthrough
//! # -> target/wasm32-wasip1/release/sluice_passthrough.wasm, root_id "passthrough"
//! ```
//!
//! Per request it makes no host call: Envoy enters it for context creation,
//! request headers, response headers, log, done and delete, and it returns
//! `Continue` (or `true`) every time.

// Built only for wasm32, like the filter glue in `sluice`: natively the
// crate is empty (clippy and `cargo build --workspace` stay happy).
#![cfg(target_arch = "wasm32")]

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(PassthroughRoot) });
}}

/// The root context (root id "passthrough"; the SDK does not check it).
struct PassthroughRoot;

impl Context for PassthroughRoot {}

impl RootContext for PassthroughRoot {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Passthrough))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One stream: every callback keeps its default (`Action::Continue`).
struct Passthrough;

impl Context for Passthrough {}

impl HttpContext for Passthrough {}
