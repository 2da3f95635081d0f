//! The audit trail. Security events are `tracing` events with target `audit` and a stable
//! `event` field (connect, disconnect, auth_failure, acl_denied, ban, ...). This module
//! counts them per kind for `$SYS/broker/audit/<event>` ([`AuditCounter`], a tracing
//! layer), and writes them, one JSON object per line, to a file with size-based rotation
//! when `[audit] file` is set ([`RotatingFile`]).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde::Deserialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// The log target of every security event. Audit events are logged at INFO, WARN or ERROR:
/// the broker's logging ([`crate::logging`]) lets nothing more verbose through for them.
pub const TARGET: &str = "audit";

/// `[audit]` in the broker configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Also write audit events to this file (JSON lines, created 0600). Without it they go
    /// only to the broker's log output (stderr, i.e. journald under systemd).
    pub file: Option<PathBuf>,
    /// Rotate the file when it reaches this size.
    pub max_file_bytes: u64,
    /// Rotated files kept (`FILE.1` is the newest).
    pub max_files: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            file: None,
            max_file_bytes: 10 * 1024 * 1024,
            max_files: 5,
        }
    }
}

/// Counts of audit events by kind, process-wide.
#[derive(Debug, Default)]
pub struct AuditCounts {
    counts: Mutex<BTreeMap<String, u64>>,
}

impl AuditCounts {
    pub fn bump(&self, event: &str) {
        let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        match m.get_mut(event) {
            Some(n) => *n += 1,
            None => {
                // Event names are code-defined; a cap keeps a bug from growing the map.
                if m.len() < 256 {
                    m.insert(event.to_string(), 1);
                }
            }
        }
    }

    pub fn snapshot(&self) -> Vec<(String, u64)> {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

/// The process-wide counts that `$SYS/broker/audit/...` publishes.
pub fn counts() -> &'static AuditCounts {
    static COUNTS: OnceLock<AuditCounts> = OnceLock::new();
    COUNTS.get_or_init(AuditCounts::default)
}

/// A tracing layer that counts `audit` events by their `event` field.
#[derive(Debug, Default, Clone, Copy)]
pub struct AuditCounter;

struct EventName(Option<String>);

impl Visit for EventName {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "event" {
            self.0 = Some(value.to_string());
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "event" && self.0.is_none() {
            self.0 = Some(format!("{value:?}").trim_matches('"').to_string());
        }
    }
}

impl<S: Subscriber> Layer<S> for AuditCounter {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != TARGET {
            return;
        }
        let mut name = EventName(None);
        event.record(&mut name);
        if let Some(n) = name.0 {
            counts().bump(&n);
        }
    }
}

/// An append-only file that rotates by size: `FILE` → `FILE.1` → ... → `FILE.N`.
#[derive(Debug)]
pub struct RotatingFile {
    inner: Mutex<RotState>,
}

#[derive(Debug)]
struct RotState {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    max_files: usize,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

impl RotatingFile {
    pub fn open(path: &Path, max_bytes: u64, max_files: usize) -> io::Result<RotatingFile> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile {
            inner: Mutex::new(RotState {
                path: path.to_path_buf(),
                file,
                size,
                max_bytes: max_bytes.max(1024),
                max_files,
            }),
        })
    }
}

impl RotState {
    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        let numbered = |n: usize| PathBuf::from(format!("{}.{n}", self.path.display()));
        if self.max_files == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(numbered(self.max_files));
            for n in (1..self.max_files).rev() {
                let _ = std::fs::rename(numbered(n), numbered(n + 1));
            }
            std::fs::rename(&self.path, numbered(1))?;
        }
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

impl Write for &RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if st.size > 0 && st.size + buf.len() as u64 > st.max_bytes {
            st.rotate()?;
        }
        st.file.write_all(buf)?;
        st.size += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .file
            .flush()
    }
}

/// `MakeWriter` for the audit file layer.
#[derive(Debug, Clone)]
pub struct AuditWriter(pub Arc<RotatingFile>);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for AuditWriter {
    type Writer = &'a RotatingFile;
    fn make_writer(&'a self) -> Self::Writer {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::prelude::*;

    #[test]
    fn rotates_by_size_and_keeps_n_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let f = RotatingFile::open(&path, 1024, 2).unwrap();
        let line = vec![b'x'; 400];
        for _ in 0..10 {
            (&f).write_all(&line).unwrap();
        }
        assert!(path.exists());
        assert!(dir.path().join("audit.log.1").exists());
        assert!(dir.path().join("audit.log.2").exists());
        assert!(
            !dir.path().join("audit.log.3").exists(),
            "only max_files kept"
        );
        assert!(std::fs::metadata(&path).unwrap().len() <= 1024);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn counter_layer_counts_audit_events_by_name() {
        let sub = tracing_subscriber::registry().with(AuditCounter);
        tracing::subscriber::with_default(sub, || {
            tracing::warn!(target: "audit", event = "unit_test_event", "x");
            tracing::warn!(target: "audit", event = "unit_test_event", "y");
            tracing::warn!(target: "other", event = "unit_test_event", "not audit");
        });
        let n = counts()
            .snapshot()
            .into_iter()
            .find(|(k, _)| k == "unit_test_event")
            .map(|(_, v)| v);
        assert_eq!(n, Some(2));
    }
}
