//! `sluice-wasm-size`: where the bytes of a wasm module go, by section and
//! (with a name section) by crate and function. `benches/size.sh` builds an
//! unstripped copy of the release modules and runs this on them.
//!
//!     sluice-wasm-size <module.wasm> [--top N]

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use wasmparser::{KnownCustom, Name, Parser, Payload};

/// The crate a Rust symbol belongs to, from the name section's mixture of
/// v0-mangled (`_RNv…Cs<hash>_4core…`), legacy-escaped
/// (`$LT$sluice..filter..X$u20$as$u20$…`) and plain (`sluice::router::…`)
/// names; C functions (the allocator) and the SDK's exports get a group.
fn crate_of(name: &str) -> String {
    if let Some(v0) = name.strip_prefix("_R") {
        // The first crate root: `C` [`s` <base-62>`_`] <decimal length> <ident>.
        let bytes = v0.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'C' {
                let mut j = i + 1;
                if bytes.get(j) == Some(&b's') {
                    while j < bytes.len() && bytes[j] != b'_' {
                        j += 1;
                    }
                    j += 1;
                }
                let digits_start = j;
                while j < bytes.len() && bytes[j].is_ascii_digit() {
                    j += 1;
                }
                if j > digits_start {
                    if let Ok(len) = v0[digits_start..j].parse::<usize>() {
                        if let Some(ident) = v0.get(j..j + len) {
                            return ident.to_string();
                        }
                    }
                }
            }
            i += 1;
        }
        return "(unknown)".into();
    }
    // Legacy mangling: _ZN <len><ident> … E; the first ident is the crate.
    if let Some(rest) = name.strip_prefix("_ZN") {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(len) = digits.parse::<usize>() {
            if let Some(ident) = rest.get(digits.len()..digits.len() + len) {
                let ident = ident
                    .replace("$LT$", "<")
                    .replace("$u20$", " ")
                    .replace("$RF$", "&")
                    .replace("..", "::");
                // `<T as Trait>`/`impl Trait for T`: the first path inside.
                let inner = ident.trim_start_matches(['<', '&', '_']);
                let inner = inner.strip_prefix("impl ").unwrap_or(inner);
                let inner = inner.strip_prefix("mut ").unwrap_or(inner);
                if let Some((krate, _)) = inner.split_once("::") {
                    return krate
                        .rsplit([' ', '<', '&'])
                        .next()
                        .unwrap_or(krate)
                        .to_string();
                }
                return inner.split(' ').next().unwrap_or(inner).to_string();
            }
        }
    }
    let plain = name
        .replace("$LT$", "<")
        .replace("$u20$", " ")
        .replace("$RF$", "&")
        .replace("..", "::");
    let plain = plain.trim_start_matches(['<', '&', '_']);
    let plain = plain.strip_prefix("impl ").unwrap_or(plain);
    if let Some((krate, _)) = plain.split_once("::") {
        return krate
            .rsplit([' ', '<', '&'])
            .next()
            .unwrap_or(krate)
            .to_string();
    }
    if name.starts_with("proxy_on_") || name.starts_with("proxy_abi") || name == "_initialize" {
        return "proxy_wasm (exported callbacks)".into();
    }
    if [
        "malloc",
        "free",
        "realloc",
        "calloc",
        "dl",
        "dispose_chunk",
        "prepend_alloc",
        "tmalloc",
        "sbrk",
        "memcpy",
        "memset",
        "memmove",
        "memcmp",
        "abort",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix))
    {
        return "(wasi-libc: allocator, mem*)".into();
    }
    "(other C/runtime functions)".into()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: sluice-wasm-size <module.wasm> [--top N]");
        std::process::exit(2);
    };
    let mut top = 25usize;
    while let Some(arg) = args.next() {
        if arg == "--top" {
            top = args.next().and_then(|n| n.parse().ok()).unwrap_or(top);
        }
    }
    let wasm = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut sections: Vec<(String, usize)> = Vec::new();
    let mut imported = 0u32;
    let mut bodies: Vec<usize> = Vec::new();
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    let mut data = 0usize;
    for payload in Parser::new(0).parse_all(&wasm) {
        let payload = payload.unwrap();
        match &payload {
            Payload::ImportSection(reader) => {
                for group in reader.clone() {
                    imported += match group.unwrap() {
                        wasmparser::Imports::Single(..) => 1,
                        wasmparser::Imports::Compact1 { items, .. } => items.count(),
                        wasmparser::Imports::Compact2 { names, .. } => names.count(),
                    };
                }
            }
            Payload::CodeSectionEntry(body) => bodies.push(body.range().len()),
            Payload::DataSection(reader) => data += reader.range().len(),
            Payload::CustomSection(reader) => {
                sections.push((
                    format!("custom \"{}\"", reader.name()),
                    reader.range().len(),
                ));
                if let KnownCustom::Name(names_reader) = reader.as_known() {
                    for subsection in names_reader {
                        if let Ok(Name::Function(map)) = subsection {
                            for naming in map.into_iter().flatten() {
                                names.insert(naming.index, naming.name.to_string());
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        if let (Some((id, range)), false) = (
            payload.as_section(),
            matches!(payload, Payload::CustomSection(_)),
        ) {
            let label = match id {
                1 => "type",
                2 => "import",
                3 => "function",
                4 => "table",
                5 => "memory",
                6 => "global",
                7 => "export",
                8 => "start",
                9 => "element",
                10 => "code",
                11 => "data",
                12 => "data count",
                _ => "other",
            };
            sections.push((label.to_string(), range.len()));
        }
    }
    let total = wasm.len();
    let custom: usize = sections
        .iter()
        .filter(|(name, _)| name.starts_with("custom"))
        .map(|(_, size)| size)
        .sum();
    println!(
        "### {path}\n\n{total} bytes ({:.1} KiB); without custom sections (roughly what a \
         stripped build keeps): {} bytes ({:.1} KiB)\n",
        total as f64 / 1024.0,
        total - custom,
        (total - custom) as f64 / 1024.0
    );
    println!("| section | bytes | share |\n|---|---:|---:|");
    for (name, size) in &sections {
        println!(
            "| {name} | {size} | {:.1} % |",
            *size as f64 * 100.0 / total as f64
        );
    }
    let code: usize = bodies.iter().sum();
    println!(
        "\n(data segments: {data} bytes; function bodies: {code} bytes in {} functions)",
        bodies.len()
    );
    if names.is_empty() {
        println!(
            "\nNo name section: build unstripped for a per-crate breakdown (benches/size.sh)."
        );
        return;
    }
    let mut by_crate: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut functions: Vec<(usize, String)> = Vec::new();
    for (index, size) in bodies.iter().enumerate() {
        let name = names
            .get(&(imported + index as u32))
            .cloned()
            .unwrap_or_else(|| format!("<function {index}>"));
        let entry = by_crate.entry(crate_of(&name)).or_default();
        entry.0 += size;
        entry.1 += 1;
        functions.push((*size, name));
    }
    let mut crates: Vec<(String, (usize, usize))> = by_crate.into_iter().collect();
    crates.sort_by_key(|c| std::cmp::Reverse(c.1 .0));
    println!("\n| crate (by function names) | code bytes | functions | share of code |\n|---|---:|---:|---:|");
    for (krate, (size, count)) in &crates {
        println!(
            "| `{krate}` | {size} | {count} | {:.1} % |",
            *size as f64 * 100.0 / code as f64
        );
    }
    functions.sort_by_key(|f| std::cmp::Reverse(f.0));
    println!("\n| largest functions | bytes |\n|---|---:|");
    for (size, name) in functions.iter().take(top) {
        let short: String = name.chars().take(110).collect();
        println!("| `{}` | {size} |", short.replace('|', "\\|"));
    }
}
