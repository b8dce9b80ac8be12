//! Checks a listener file for file-based LDS before it is pushed, with
//! Envoy's own validation (which runs Sluice's config check too).
//!
//! ```text
//! sluice-lds-check BOOTSTRAP [LISTENER]
//! ```
//!
//! `envoy --mode validate -c BOOTSTRAP` checks the bootstrap but does not
//! read the LDS file it names (validate mode starts no subscription), so a
//! broken listener file passes it. This tool validates the bootstrap together
//! with LISTENER (default: the file the bootstrap's
//! `lds_config.path_config_source.path` names) turned into a static listener
//! (`--config-yaml` adds it to the bootstrap). Check the temp file before the
//! rename that pushes it:
//!
//! ```text
//! sluice-lds-check envoy/examples/sluice-lds-bootstrap.yaml envoy/examples/sluice-lds-listener.yaml
//! sluice-lds-check /etc/envoy/sluice/bootstrap.yaml /etc/envoy/sluice/.listener.yaml.new \
//!     && mv /etc/envoy/sluice/.listener.yaml.new /etc/envoy/sluice/listener.yaml
//! ```
//!
//! Relative paths inside the files (the wasm module's) resolve against the
//! current directory, as for Envoy. Exit status: 0 valid, 1 invalid, 2 usage
//! or I/O error. Envoy is `$SLUICE_ENVOY` or the one `scripts/setup.sh`
//! installed.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

const USAGE: &str = "usage: sluice-lds-check BOOTSTRAP [LISTENER]\n\
  Validates BOOTSTRAP with LISTENER (default: the LDS file BOOTSTRAP names) as\n\
  a static listener, using `envoy --mode validate` (which runs Sluice's config check).";

const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

/// The `path:` under `path_config_source:` in a bootstrap, if any.
fn lds_path(bootstrap: &str) -> Option<String> {
    let mut lines = bootstrap.lines().skip_while(|l| {
        let t = l.trim_start();
        !t.starts_with("path_config_source:")
    });
    let head = lines.next()?;
    // `path_config_source: { path: x }` on one line.
    if let Some(rest) = head.split_once("path:").map(|(_, r)| r) {
        let v = rest.trim().trim_end_matches('}').trim();
        return Some(unquote(v.split(',').next().unwrap_or(v).trim()));
    }
    let indent = head.len() - head.trim_start().len();
    let mut child_indent = None;
    for l in lines {
        let t = l.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let this = l.len() - t.len();
        if this <= indent {
            return None;
        }
        // Only a direct key (not watched_directory's own `path:`).
        if *child_indent.get_or_insert(this) != this {
            continue;
        }
        if let Some(v) = t.strip_prefix("path:") {
            let v = v.split(" #").next().unwrap_or(v).trim();
            return Some(unquote(v));
        }
    }
    None
}

fn unquote(v: &str) -> String {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
        .unwrap_or(v)
        .to_string()
}

/// A resource's own `"@type"` key: the first key of a list item (`- "@type":`)
/// or another key of one (two spaces in); nested typed configs are deeper.
fn is_type_line(line: &str) -> bool {
    let Some(t) = line.strip_prefix("- ").or_else(|| line.strip_prefix("  ")) else {
        return false;
    };
    t.starts_with("\"@type\":") || t.starts_with("'@type':")
}

/// Turns an LDS file (a discovery response: `resources:` as a YAML block
/// list of `"@type": ...Listener` resources) into bootstrap YAML that adds
/// the same listeners under `static_resources.listeners`.
fn as_static_listeners(listener_file: &str) -> Result<String, String> {
    let mut out = String::from("static_resources:\n  listeners:\n");
    let mut in_resources = false;
    let mut pending_dash = false;
    let mut count = 0usize;
    for line in listener_file.lines() {
        if !in_resources {
            if line.trim_end() == "resources:" {
                in_resources = true;
            } else if line.starts_with("resources:") {
                return Err(
                    "`resources:` must be a YAML block list (`- \"@type\": ...` items)".into(),
                );
            }
            continue;
        }
        let t = line.trim_start();
        let top_level = !line.is_empty() && !line.starts_with([' ', '-', '#']);
        if top_level {
            break; // the next top-level key (e.g. version_info)
        }
        if is_type_line(line) {
            if !t.contains(LISTENER_TYPE) {
                return Err(format!("a resource that is not a Listener: {}", t.trim()));
            }
            if line.starts_with("- ") {
                pending_dash = true;
                count += 1;
            }
            continue;
        }
        if line.starts_with("- ") {
            count += 1;
        }
        out.push_str("    ");
        if pending_dash && !t.is_empty() && !t.starts_with('#') {
            // `  name: x` was the second key of the item: it starts it now.
            let rest = line
                .strip_prefix("  ")
                .ok_or_else(|| format!("unexpected indentation after \"@type\": {line}"))?;
            out.push_str("- ");
            out.push_str(rest);
            pending_dash = false;
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    if !in_resources {
        return Err("no top-level `resources:` list".into());
    }
    if count == 0 {
        return Err("`resources:` lists no listener".into());
    }
    Ok(out)
}

fn run(bootstrap_path: &Path, listener_arg: Option<PathBuf>) -> Result<bool, String> {
    let bootstrap = std::fs::read_to_string(bootstrap_path)
        .map_err(|e| format!("{}: {e}", bootstrap_path.display()))?;
    let watched = lds_path(&bootstrap);
    let listener_path = match (listener_arg, &watched) {
        (Some(p), _) => p,
        (None, Some(w)) => PathBuf::from(w),
        (None, None) => {
            return Err(format!(
                "{} names no lds_config.path_config_source.path: give the listener file",
                bootstrap_path.display()
            ))
        }
    };
    match &watched {
        Some(w) if !Path::new(w).exists() => println!(
            "sluice-lds-check: note: the watched file {w} does not exist yet; Envoy will not start without it"
        ),
        None => println!("sluice-lds-check: note: the bootstrap has no file-based LDS source"),
        _ => {}
    }
    let listener = std::fs::read_to_string(&listener_path)
        .map_err(|e| format!("{}: {e}", listener_path.display()))?;
    let listeners =
        as_static_listeners(&listener).map_err(|e| format!("{}: {e}", listener_path.display()))?;
    let envoy = sluice_envoy::envoy::envoy_binary().map_err(|e| e.to_string())?;
    let out = Command::new(envoy)
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-l",
            "warning",
        ])
        .arg("-c")
        .arg(bootstrap_path)
        .arg("--config-yaml")
        .arg(&listeners)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running envoy: {e}"))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        println!(
            "sluice-lds-check: OK: {} with {} (Envoy and Sluice accept it)",
            bootstrap_path.display(),
            listener_path.display()
        );
        return Ok(true);
    }
    println!(
        "sluice-lds-check: INVALID: {} with {}:",
        bootstrap_path.display(),
        listener_path.display()
    );
    // Sluice's own refusal first (it names the JSON path), then Envoy's.
    let lines: Vec<&str> = text.lines().collect();
    let reasons: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("config refused") || l.contains("critical") || l.contains("error"))
        .collect();
    let shown: Vec<&&str> = if reasons.is_empty() {
        lines
            .iter()
            .rev()
            .take(10)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect()
    } else {
        reasons
    };
    for l in shown {
        println!("  {l}");
    }
    Ok(false)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (bootstrap, listener) = match args.as_slice() {
        [b] if !b.starts_with('-') => (PathBuf::from(b), None),
        [b, l] if !b.starts_with('-') => (PathBuf::from(b), Some(PathBuf::from(l))),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&bootstrap, listener) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("sluice-lds-check: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_watched_path() {
        let b = "dynamic_resources:\n  lds_config:\n    path_config_source:\n      # the file\n      path: \"/etc/x/l.yaml\"\n      watched_directory:\n        path: /etc/y\n";
        assert_eq!(lds_path(b).as_deref(), Some("/etc/x/l.yaml"));
        let b = "dynamic_resources:\n  lds_config:\n    path_config_source: { path: a/b.yaml }\n";
        assert_eq!(lds_path(b).as_deref(), Some("a/b.yaml"));
        let b = "  path_config_source:\n    watched_directory:\n      path: /d\n    path: /f\n";
        assert_eq!(lds_path(b).as_deref(), Some("/f"));
        assert_eq!(lds_path("admin: {}\n"), None);
    }

    #[test]
    fn a_listener_resource_becomes_a_static_listener() {
        let f = "# comment\nversion_info: \"1\"\nresources:\n- \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n  # the name\n  name: l\n  address:\n    socket_address: { port_value: 1 }\n";
        let s = as_static_listeners(f).unwrap();
        assert_eq!(
            s,
            "static_resources:\n  listeners:\n      # the name\n    - name: l\n      address:\n        socket_address: { port_value: 1 }\n"
        );
        assert!(as_static_listeners("resources: []\n").is_err());
        assert!(as_static_listeners("resources:\n- \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\n  name: c\n").is_err());
    }
}
