//! Counting the ABI crossings of a proxy-wasm module, without touching the
//! host: the module is rewritten so that every crossing announces itself
//! through the one channel every host keeps, `proxy_log`.
//!
//! * Every call the module makes to an import (`env.proxy_*`, WASI) goes
//!   through a new wrapper function that first logs `hc>module.name` at
//!   trace level, then calls the import with the same arguments.
//! * Every exported function (the callbacks `proxy_on_*`, `malloc`, …) is
//!   re-exported as a wrapper that logs `cb<name` and then runs the original,
//!   so calls from the host into the module are counted too: the callbacks
//!   and the `malloc` the host calls to hand over every buffer it returns.
//!
//! A host that records trace-level logs (the wasmtime fake in `host-tests`
//! does, with `ProxyBuilder::log_level(LogLevel::Trace)`) then yields the
//! exact sequence of crossings; [`tally`] counts them. The counting calls are
//! not themselves counted (the wrappers call the real `proxy_log`).
//!
//! The message is written to linear memory at address 0 for the duration of
//! the log call, and the 64 bytes there are saved and restored around it, so
//! the module's own memory is never disturbed.
//!
//! Only for measurement: the rewritten module is slower than the original
//! (a log call per crossing) and is never used for timing.
//!
//! Implementation: the module is parsed with `wasmparser` (already a
//! dependency of wasmtime) and re-emitted section by section. Function
//! bodies are copied byte for byte, except `call`, `return_call` and
//! `ref.func`, whose function index is remapped. Custom sections (names,
//! producers) are dropped.

use std::collections::BTreeMap;
use wasmparser::{
    ElementItems, ElementKind, ExternalKind, FunctionBody, Imports, Operator, Parser, Payload,
    TypeRef, ValType,
};

/// Prefix of the log line for a call from the module to the host.
pub const IMPORT_MARK: &str = "hc>";
/// Prefix of the log line for a call from the host into the module.
pub const EXPORT_MARK: &str = "cb<";

/// Bytes of linear memory (at address 0) the wrappers borrow.
const SCRATCH: usize = 64;

/// The rewritten module and what was wrapped.
#[derive(Debug, Clone)]
pub struct Instrumented {
    pub wasm: Vec<u8>,
    /// `module.name` of every function import, in index order.
    pub imports: Vec<String>,
    /// Every exported function.
    pub exports: Vec<String>,
    /// Whether `env.proxy_log` had to be added as an import.
    pub added_log_import: bool,
}

/// Rewrites `wasm` so that every ABI crossing logs itself (see module docs).
pub fn instrument(wasm: &[u8]) -> Result<Instrumented, String> {
    let module = Scan::new(wasm)?;
    module.emit(wasm)
}

/// Counts the crossings in log messages (only the marked ones), by
/// message; e.g. `hc>env.proxy_get_header_map_value` → 7.
pub fn tally<'a>(messages: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for message in messages {
        if message.starts_with(IMPORT_MARK) || message.starts_with(EXPORT_MARK) {
            *counts.entry(message.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

// ---------------------------------------------------------------- scanning

#[derive(Debug, Clone, PartialEq, Eq)]
struct FuncType {
    params: Vec<ValType>,
    results: Vec<ValType>,
}

struct FuncImport {
    module: String,
    name: String,
    type_index: u32,
}

struct FuncExport {
    name: String,
    index: u32,
}

/// What the rewrite needs to know before emitting anything.
struct Scan {
    /// Function types by type index (`None` for non-function types).
    types: Vec<Option<FuncType>>,
    func_imports: Vec<FuncImport>,
    /// Type index of every defined function.
    defined: Vec<u32>,
    exports: Vec<FuncExport>,
    /// Index of `env.proxy_log` among the function imports, if imported.
    log_import: Option<u32>,
}

fn err(e: impl std::fmt::Display) -> String {
    format!("instrument: {e}")
}

impl Scan {
    fn new(wasm: &[u8]) -> Result<Scan, String> {
        let mut scan = Scan {
            types: Vec::new(),
            func_imports: Vec::new(),
            defined: Vec::new(),
            exports: Vec::new(),
            log_import: None,
        };
        for payload in Parser::new(0).parse_all(wasm) {
            match payload.map_err(err)? {
                Payload::TypeSection(reader) => {
                    for ty in reader.into_iter_err_on_gc_types() {
                        let ty = ty.map_err(err)?;
                        scan.types.push(Some(FuncType {
                            params: ty.params().to_vec(),
                            results: ty.results().to_vec(),
                        }));
                    }
                }
                Payload::ImportSection(reader) => {
                    for group in reader {
                        let imports: Vec<(String, String, TypeRef)> = match group.map_err(err)? {
                            Imports::Single(_, import) => {
                                vec![(import.module.into(), import.name.into(), import.ty)]
                            }
                            Imports::Compact1 { module, items } => items
                                .into_iter()
                                .map(|item| {
                                    item.map(|item| (module.into(), item.name.into(), item.ty))
                                })
                                .collect::<Result<_, _>>()
                                .map_err(err)?,
                            Imports::Compact2 { module, ty, names } => names
                                .into_iter()
                                .map(|name| name.map(|name| (module.into(), name.into(), ty)))
                                .collect::<Result<_, _>>()
                                .map_err(err)?,
                        };
                        for (module, name, ty) in imports {
                            let TypeRef::Func(type_index) = ty else {
                                return Err(err(format!(
                                    "import {module}.{name} is not a function; only function \
                                     imports are supported"
                                )));
                            };
                            if module == "env" && name == "proxy_log" {
                                scan.log_import = Some(len_u32(scan.func_imports.len()));
                            }
                            scan.func_imports.push(FuncImport {
                                module,
                                name,
                                type_index,
                            });
                        }
                    }
                }
                Payload::FunctionSection(reader) => {
                    for ty in reader {
                        scan.defined.push(ty.map_err(err)?);
                    }
                }
                Payload::ExportSection(reader) => {
                    for export in reader {
                        let export = export.map_err(err)?;
                        if export.kind == ExternalKind::Func {
                            scan.exports.push(FuncExport {
                                name: export.name.into(),
                                index: export.index,
                            });
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(index) = scan.log_import {
            let ty = scan
                .func_imports
                .get(index as usize)
                .and_then(|import| scan.func_type(import.type_index));
            if ty != Some(&log_type()) {
                return Err(err("env.proxy_log has an unexpected signature"));
            }
        }
        Ok(scan)
    }

    fn func_type(&self, type_index: u32) -> Option<&FuncType> {
        self.types.get(type_index as usize).and_then(Option::as_ref)
    }

    /// Type index of any function (import or defined, by old index).
    fn type_of(&self, func: u32) -> Option<u32> {
        let imports = self.func_imports.len();
        match (func as usize).checked_sub(imports) {
            None => self.func_imports.get(func as usize).map(|i| i.type_index),
            Some(defined) => self.defined.get(defined).copied(),
        }
    }
}

fn log_type() -> FuncType {
    FuncType {
        params: vec![ValType::I32, ValType::I32, ValType::I32],
        results: vec![ValType::I32],
    }
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------- emitting

/// Index arithmetic of the rewritten module.
struct Layout {
    imports: u32,
    /// 1 if `env.proxy_log` is appended to the imports.
    added: u32,
    defined: u32,
    /// Function index of the real `proxy_log` in the new module.
    log: u32,
    /// Type index of `(i32 i32 i32) -> i32` when it had to be added.
    added_log_type: Option<u32>,
}

impl Layout {
    /// New index of an old function index; calls to imports go to their
    /// wrapper.
    fn map(&self, old: u32) -> u32 {
        if old < self.imports {
            self.import_wrapper(old)
        } else {
            old + self.added
        }
    }

    /// New index of an old function index, without wrapper redirection.
    fn shifted(&self, old: u32) -> u32 {
        if old < self.imports {
            old
        } else {
            old + self.added
        }
    }

    fn import_wrapper(&self, import: u32) -> u32 {
        self.imports + self.added + self.defined + import
    }

    fn export_wrapper(&self, export: u32) -> u32 {
        self.imports + self.added + self.defined + self.imports + export
    }
}

impl Scan {
    fn emit(&self, wasm: &[u8]) -> Result<Instrumented, String> {
        let added_log_type = match self.log_import {
            Some(_) => None,
            None => Some(len_u32(self.types.len())),
        };
        let layout = Layout {
            imports: len_u32(self.func_imports.len()),
            added: u32::from(self.log_import.is_none()),
            defined: len_u32(self.defined.len()),
            log: self
                .log_import
                .unwrap_or_else(|| len_u32(self.func_imports.len())),
            added_log_type,
        };
        let mut out = Vec::with_capacity(wasm.len() * 2);
        out.extend_from_slice(&[0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00]);
        let mut saw_imports = false;
        let mut bodies: Vec<Vec<u8>> = Vec::new();
        let mut code_count = 0u32;
        for payload in Parser::new(0).parse_all(wasm) {
            let payload = payload.map_err(err)?;
            match &payload {
                Payload::Version { .. } | Payload::End(_) | Payload::CustomSection(_) => {}
                Payload::TypeSection(reader) => {
                    let raw = section_entries(wasm, reader.range())?;
                    let mut body = Vec::new();
                    let extra = u32::from(layout.added_log_type.is_some());
                    uleb(&mut body, u64::from(reader.count() + extra));
                    body.extend_from_slice(raw);
                    if layout.added_log_type.is_some() {
                        func_type_bytes(&mut body, &log_type());
                    }
                    section(&mut out, 1, &body);
                }
                Payload::ImportSection(_) => {
                    saw_imports = true;
                    section(&mut out, 2, &self.import_section(&layout));
                }
                Payload::FunctionSection(_) => {
                    if !saw_imports {
                        saw_imports = true;
                        section(&mut out, 2, &self.import_section(&layout));
                    }
                    let mut body = Vec::new();
                    let total = self.defined.len() + self.func_imports.len() + self.exports.len();
                    uleb(&mut body, total as u64);
                    for &ty in &self.defined {
                        uleb(&mut body, u64::from(ty));
                    }
                    for import in &self.func_imports {
                        uleb(&mut body, u64::from(import.type_index));
                    }
                    for export in &self.exports {
                        let ty = self
                            .type_of(export.index)
                            .ok_or_else(|| err(format!("export {} has no type", export.name)))?;
                        uleb(&mut body, u64::from(ty));
                    }
                    section(&mut out, 3, &body);
                }
                Payload::ExportSection(reader) => {
                    let mut body = Vec::new();
                    uleb(&mut body, u64::from(reader.count()));
                    let mut next_func_export = 0u32;
                    for export in reader.clone() {
                        let export = export.map_err(err)?;
                        name(&mut body, export.name);
                        let (kind, index) = match export.kind {
                            ExternalKind::Func => {
                                let index = layout.export_wrapper(next_func_export);
                                next_func_export += 1;
                                (0x00, index)
                            }
                            ExternalKind::Table => (0x01, export.index),
                            ExternalKind::Memory => (0x02, export.index),
                            ExternalKind::Global => (0x03, export.index),
                            ExternalKind::Tag => (0x04, export.index),
                            other => return Err(err(format!("unsupported export kind {other:?}"))),
                        };
                        body.push(kind);
                        uleb(&mut body, u64::from(index));
                    }
                    section(&mut out, 7, &body);
                }
                Payload::StartSection { func, .. } => {
                    let mut body = Vec::new();
                    uleb(&mut body, u64::from(layout.map(*func)));
                    section(&mut out, 8, &body);
                }
                Payload::ElementSection(reader) => {
                    // Re-encoded so that table entries naming an import go
                    // through its wrapper too (indirect calls are counted).
                    match self.element_section(wasm, reader, &layout) {
                        Ok(body) => section(&mut out, 9, &body),
                        // A form we do not re-encode is fine as long as no
                        // index moved: copy it (indirect calls to imports,
                        // if any, then go uncounted).
                        Err(_) if layout.added == 0 => {
                            copy_section(&mut out, wasm, 9, reader.range())?
                        }
                        Err(e) => return Err(e),
                    }
                }
                Payload::CodeSectionStart { count, .. } => {
                    code_count = *count;
                }
                Payload::CodeSectionEntry(body) => {
                    bodies.push(rewrite_body(wasm, body, &layout)?);
                    if len_u32(bodies.len()) == code_count {
                        for (index, import) in self.func_imports.iter().enumerate() {
                            let ty = self.func_type(import.type_index).ok_or_else(|| {
                                err(format!(
                                    "import {}.{} has no type",
                                    import.module, import.name
                                ))
                            })?;
                            let label = format!("{IMPORT_MARK}{}.{}", import.module, import.name);
                            bodies.push(wrapper_body(ty, &label, len_u32(index), layout.log));
                        }
                        for export in &self.exports {
                            let ty = self
                                .type_of(export.index)
                                .and_then(|ty| self.func_type(ty))
                                .ok_or_else(|| {
                                    err(format!("export {} has no type", export.name))
                                })?;
                            let label = format!("{EXPORT_MARK}{}", export.name);
                            bodies.push(wrapper_body(
                                ty,
                                &label,
                                layout.shifted(export.index),
                                layout.log,
                            ));
                        }
                        let mut section_body = Vec::new();
                        uleb(&mut section_body, bodies.len() as u64);
                        for body in &bodies {
                            uleb(&mut section_body, body.len() as u64);
                            section_body.extend_from_slice(body);
                        }
                        section(&mut out, 10, &section_body);
                    }
                }
                other => match other.as_section() {
                    // Table, memory, global, tag, data count, data: unchanged.
                    Some((id, range)) => copy_section(&mut out, wasm, id, range)?,
                    None => return Err(err(format!("unexpected payload {other:?}"))),
                },
            }
        }
        Ok(Instrumented {
            wasm: out,
            imports: self
                .func_imports
                .iter()
                .map(|i| format!("{}.{}", i.module, i.name))
                .collect(),
            exports: self.exports.iter().map(|e| e.name.clone()).collect(),
            added_log_import: layout.added == 1,
        })
    }

    fn import_section(&self, layout: &Layout) -> Vec<u8> {
        let mut body = Vec::new();
        uleb(
            &mut body,
            self.func_imports.len() as u64 + u64::from(layout.added),
        );
        for import in &self.func_imports {
            name(&mut body, &import.module);
            name(&mut body, &import.name);
            body.push(0x00);
            uleb(&mut body, u64::from(import.type_index));
        }
        if let Some(ty) = layout.added_log_type {
            name(&mut body, "env");
            name(&mut body, "proxy_log");
            body.push(0x00);
            uleb(&mut body, u64::from(ty));
        }
        body
    }

    /// Re-encodes element segments with shifted function indices. Only the
    /// forms compilers emit for function tables are supported.
    fn element_section(
        &self,
        wasm: &[u8],
        reader: &wasmparser::ElementSectionReader<'_>,
        layout: &Layout,
    ) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        uleb(&mut body, u64::from(reader.count()));
        for element in reader.clone() {
            let element = element.map_err(err)?;
            let ElementItems::Functions(functions) = element.items else {
                return Err(err("element segments with expressions are not supported"));
            };
            match element.kind {
                ElementKind::Active {
                    table_index,
                    offset_expr,
                } if table_index.unwrap_or(0) == 0 => {
                    body.push(0x00);
                    let range = offset_expr.get_binary_reader().range();
                    body.extend_from_slice(
                        wasm.get(range)
                            .ok_or_else(|| err("element offset out of range"))?,
                    );
                }
                _ => return Err(err("only active element segments of table 0 are supported")),
            }
            let functions: Vec<u32> = functions
                .into_iter()
                .collect::<Result<_, _>>()
                .map_err(err)?;
            uleb(&mut body, functions.len() as u64);
            for func in functions {
                uleb(&mut body, u64::from(layout.map(func)));
            }
        }
        Ok(body)
    }
}

/// A function body with every function index remapped.
fn rewrite_body(wasm: &[u8], body: &FunctionBody<'_>, layout: &Layout) -> Result<Vec<u8>, String> {
    let range = body.range();
    let mut locals = body.get_locals_reader().map_err(err)?;
    for _ in 0..locals.get_count() {
        locals.read().map_err(err)?;
    }
    let ops_start = locals.original_position();
    let mut out = Vec::with_capacity(range.len() + 16);
    out.extend_from_slice(
        wasm.get(range.start..ops_start)
            .ok_or_else(|| err("locals out of range"))?,
    );
    let mut reader = body.get_operators_reader().map_err(err)?;
    let mut pending: Option<(usize, Option<(u8, u32)>)> = None;
    let flush = |out: &mut Vec<u8>,
                 pending: Option<(usize, Option<(u8, u32)>)>,
                 end: usize|
     -> Result<(), String> {
        if let Some((start, replacement)) = pending {
            match replacement {
                Some((opcode, index)) => {
                    out.push(opcode);
                    uleb(out, u64::from(index));
                }
                None => out.extend_from_slice(
                    wasm.get(start..end)
                        .ok_or_else(|| err("operator out of range"))?,
                ),
            }
        }
        Ok(())
    };
    while !reader.eof() {
        let (op, offset) = reader.read_with_offset().map_err(err)?;
        flush(&mut out, pending.take(), offset)?;
        let replacement = match op {
            Operator::Call { function_index } => Some((0x10, layout.map(function_index))),
            Operator::ReturnCall { function_index } => Some((0x12, layout.map(function_index))),
            Operator::RefFunc { function_index } => Some((0xd2, layout.map(function_index))),
            _ => None,
        };
        pending = Some((offset, replacement));
    }
    flush(&mut out, pending.take(), reader.original_position())?;
    if out.last() != Some(&0x0b) {
        return Err(err("function body does not end with `end`"));
    }
    Ok(out)
}

/// `label` logged at trace level (with the 64 bytes at address 0 saved and
/// restored around it), then `target` called with the wrapper's arguments.
fn wrapper_body(ty: &FuncType, label: &str, target: u32, log: u32) -> Vec<u8> {
    let params = len_u32(ty.params.len());
    let mut label = label.as_bytes().to_vec();
    label.truncate(SCRATCH);
    let words = SCRATCH / 8;
    let mut body = Vec::new();
    // Locals: `words` i64 to save the scratch bytes in.
    uleb(&mut body, 1);
    uleb(&mut body, words as u64);
    body.push(0x7e);
    let memarg = |body: &mut Vec<u8>, offset: usize| {
        uleb(body, 0); // align 1
        uleb(body, offset as u64);
    };
    for word in 0..words {
        body.extend_from_slice(&[0x41, 0x00]); // i32.const 0
        body.push(0x29); // i64.load
        memarg(&mut body, word * 8);
        body.push(0x21); // local.set
        uleb(&mut body, u64::from(params) + word as u64);
    }
    for (word, chunk) in label.chunks(8).enumerate() {
        let mut bytes = [0u8; 8];
        for (slot, &byte) in bytes.iter_mut().zip(chunk) {
            *slot = byte;
        }
        body.extend_from_slice(&[0x41, 0x00]);
        body.push(0x42); // i64.const
        sleb(&mut body, i64::from_le_bytes(bytes));
        body.push(0x37); // i64.store
        memarg(&mut body, word * 8);
    }
    body.extend_from_slice(&[0x41, 0x00]); // level: trace
    body.extend_from_slice(&[0x41, 0x00]); // message at 0
    body.push(0x41);
    sleb(&mut body, label.len() as i64);
    body.push(0x10);
    uleb(&mut body, u64::from(log));
    body.push(0x1a); // drop the status
    for word in 0..words {
        body.extend_from_slice(&[0x41, 0x00]);
        body.push(0x20); // local.get
        uleb(&mut body, u64::from(params) + word as u64);
        body.push(0x37);
        memarg(&mut body, word * 8);
    }
    for param in 0..params {
        body.push(0x20);
        uleb(&mut body, u64::from(param));
    }
    body.push(0x10);
    uleb(&mut body, u64::from(target));
    body.push(0x0b);
    body
}

// ---------------------------------------------------------------- encoding

fn uleb(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn sleb(out: &mut Vec<u8>, mut value: i64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        let done = (value == 0 && byte & 0x40 == 0) || (value == -1 && byte & 0x40 != 0);
        if done {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn name(out: &mut Vec<u8>, text: &str) {
    uleb(out, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

fn val_type_byte(ty: ValType) -> u8 {
    match ty {
        ValType::I32 => 0x7f,
        ValType::I64 => 0x7e,
        ValType::F32 => 0x7d,
        ValType::F64 => 0x7c,
        ValType::V128 => 0x7b,
        ValType::Ref(_) => 0x70,
    }
}

fn func_type_bytes(out: &mut Vec<u8>, ty: &FuncType) {
    out.push(0x60);
    uleb(out, ty.params.len() as u64);
    out.extend(ty.params.iter().map(|&t| val_type_byte(t)));
    uleb(out, ty.results.len() as u64);
    out.extend(ty.results.iter().map(|&t| val_type_byte(t)));
}

fn section(out: &mut Vec<u8>, id: u8, body: &[u8]) {
    out.push(id);
    uleb(out, body.len() as u64);
    out.extend_from_slice(body);
}

fn copy_section(
    out: &mut Vec<u8>,
    wasm: &[u8],
    id: u8,
    range: std::ops::Range<usize>,
) -> Result<(), String> {
    let body = wasm.get(range).ok_or_else(|| err("section out of range"))?;
    section(out, id, body);
    Ok(())
}

/// The entries of a vector section: its bytes after the leading count.
fn section_entries(wasm: &[u8], range: std::ops::Range<usize>) -> Result<&[u8], String> {
    let bytes = wasm.get(range).ok_or_else(|| err("section out of range"))?;
    let count_len = bytes
        .iter()
        .position(|&b| b & 0x80 == 0)
        .ok_or_else(|| err("bad section count"))?
        + 1;
    bytes
        .get(count_len..)
        .ok_or_else(|| err("bad section count"))
}
