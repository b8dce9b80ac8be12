//! One wasmtime [`Engine`] per process and a compile-once cache of modules.
//!
//! Compiling sluice.wasm with Cranelift is the expensive part of a test run,
//! so it happens once per test binary (keyed by path, or by content for
//! in-memory modules); every [`Vm`](crate::Vm) then only instantiates.

use crate::imports;
use crate::vm::HostState;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use wasmtime::{Config, Engine, ExternType, InstancePre, Module, OptLevel, Strategy};

/// How often the watchdog thread bumps the engine epoch. A guest call gets a
/// deadline of `call_timeout / EPOCH_TICK` ticks, so a runaway loop in the
/// plugin traps instead of hanging the test run.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(50);

/// The process-wide engine (Cranelift, epoch interruption on).
pub(crate) fn engine() -> Result<&'static Engine, String> {
    static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let mut config = Config::new();
            config
                .strategy(Strategy::Cranelift)
                .cranelift_opt_level(OptLevel::Speed)
                .parallel_compilation(true)
                .epoch_interruption(true);
            // `SLUICE_WASM_PERFMAP=1`: name the compiled Wasm functions
            // for `perf` (/tmp/perf-<pid>.map), to profile a benchmark.
            if std::env::var_os("SLUICE_WASM_PERFMAP").is_some() {
                config.profiler(wasmtime::ProfilingStrategy::PerfMap);
            }
            let engine = Engine::new(&config).map_err(|e| format!("wasmtime engine: {e:?}"))?;
            let ticker = engine.clone();
            std::thread::Builder::new()
                .name("sluice-host-epoch".into())
                .spawn(move || loop {
                    std::thread::sleep(EPOCH_TICK);
                    ticker.increment_epoch();
                })
                .map_err(|e| format!("epoch thread: {e}"))?;
            Ok(engine)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The Proxy-Wasm ABI version a module declares through its
/// `proxy_abi_version_*` export (proxy-wasm-cpp-host `BytecodeUtil::getAbiVersion`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbiVersion {
    /// `proxy_abi_version_0_2_0`.
    V0_2_0,
    /// `proxy_abi_version_0_2_1`.
    V0_2_1,
}

/// A compiled, validated module plus its pre-linked instance template.
pub(crate) struct LoadedModule {
    pub(crate) name: String,
    pub(crate) pre: InstancePre<HostState>,
    pub(crate) abi: AbiVersion,
    pub(crate) compile_time: Duration,
}

type Cache = Mutex<HashMap<CacheKey, Arc<OnceLock<Result<Arc<LoadedModule>, String>>>>>;

#[derive(Clone, PartialEq, Eq, Hash)]
enum CacheKey {
    Path(PathBuf),
    Bytes(u64, usize),
}

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn cached(
    key: CacheKey,
    load: impl FnOnce() -> Result<LoadedModule, String>,
) -> Result<Arc<LoadedModule>, String> {
    let cell = {
        let mut map = cache().lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key).or_default().clone()
    };
    // Other threads asking for the same module block here until it is compiled.
    cell.get_or_init(|| load().map(Arc::new)).clone()
}

/// Loads (once per process) the module at `path`.
pub(crate) fn load_path(path: &Path) -> Result<Arc<LoadedModule>, String> {
    let key = CacheKey::Path(path.canonicalize().unwrap_or_else(|_| path.to_path_buf()));
    cached(key, || {
        let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        compile(&path.display().to_string(), &bytes)
    })
}

/// Loads (once per process) an in-memory module.
pub(crate) fn load_bytes(name: &str, bytes: &[u8]) -> Result<Arc<LoadedModule>, String> {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    cached(CacheKey::Bytes(h.finish(), bytes.len()), || {
        compile(name, bytes)
    })
}

fn compile(name: &str, bytes: &[u8]) -> Result<LoadedModule, String> {
    let engine = engine()?;
    let started = Instant::now();
    let module =
        Module::new(engine, bytes).map_err(|e| format!("{name}: failed to compile: {e:?}"))?;
    let compile_time = started.elapsed();
    let abi = abi_version(&module).ok_or_else(|| {
        format!(
            "{name}: Missing or unknown Proxy-Wasm ABI version (no proxy_abi_version_0_2_1 \
             export); Envoy refuses such a module"
        )
    })?;
    check_memory(name, &module)?;
    let linker = imports::linker(engine, abi)?;
    check_imports(name, &module, abi)?;
    let pre = linker
        .instantiate_pre(&module)
        .map_err(|e| format!("{name}: Failed to load Wasm module: {e:?}"))?;
    Ok(LoadedModule {
        name: name.to_owned(),
        pre,
        abi,
        compile_time,
    })
}

fn abi_version(module: &Module) -> Option<AbiVersion> {
    let mut found = None;
    for export in module.exports() {
        match export.name() {
            "proxy_abi_version_0_2_1" => found = Some(AbiVersion::V0_2_1),
            "proxy_abi_version_0_2_0" if found.is_none() => found = Some(AbiVersion::V0_2_0),
            _ => {}
        }
    }
    found
}

fn check_memory(name: &str, module: &Module) -> Result<(), String> {
    let exported = module
        .exports()
        .any(|e| e.name() == "memory" && matches!(e.ty(), ExternType::Memory(_)));
    if exported {
        Ok(())
    } else {
        Err(format!(
            "{name}: the module does not export its linear memory as \"memory\"; \
             this fake host (like Envoy's runtimes) needs it to exchange data"
        ))
    }
}

/// Envoy links imports by name; anything it does not register makes it
/// refuse the module ("Failed to load Wasm module due to a missing import").
/// We report every offender at once, with the message Envoy would log.
fn check_imports(name: &str, module: &Module, abi: AbiVersion) -> Result<(), String> {
    let engine = module.engine();
    let mut problems = Vec::new();
    for import in module.imports() {
        let full = format!("{}.{}", import.module(), import.name());
        let ExternType::Func(want) = import.ty() else {
            problems.push(format!(
                "Failed to load Wasm module due to a missing import: {full} \
                 (only function imports are supported)"
            ));
            continue;
        };
        match imports::signature(engine, abi, import.module(), import.name()) {
            None => problems.push(format!(
                "Failed to load Wasm module due to a missing import: {full} \
                 (Envoy 1.40 does not provide it)"
            )),
            Some(have) => {
                if !wasmtime::FuncType::eq(&want, &have) {
                    problems.push(format!(
                        "Failed to load Wasm module due to an import type mismatch: {full}, \
                         want: {want:?}, but host exports: {have:?}"
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{name}:\n  {}", problems.join("\n  ")))
    }
}
