//! The broker's log outputs as one tracing layer, [`BrokerLog`]: the main log (stderr, text
//! or JSON, filtered by `BULWARK_LOG`), the audit counts for `$SYS` ([`AuditCounter`]) and,
//! with `[audit] file`, the audit file. Every `audit` event reaches the counts and the
//! file whatever the main log's filter says; the main log shows what its filter lets
//! through.
//!
//! One layer rather than a stack of per-layer filtered ones (`Layer::with_filter`): a
//! filtered layer looks the span up in the registry each time a span is entered or left,
//! to know whether its filter enabled it, and every connection's task enters its `conn`
//! span on every poll. With the main log and the audit file filtered that way, entering
//! and leaving spans was 13 % of the broker's instructions per message.

use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Filter, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::audit::{AuditCounter, TARGET};

/// A layer of any kind, boxed.
pub type BoxedLayer<S> = Box<dyn Layer<S> + Send + Sync + 'static>;
/// A filter of any kind, boxed.
pub type BoxedFilter<S> = Box<dyn Filter<S> + Send + Sync + 'static>;

/// The main log as JSON lines (`--log-format json`): each event flattened, with the span
/// it happened in (a connection's peer, listener and client id).
pub fn json_log<S, W>(writer: W) -> BoxedLayer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    json_lines(writer, true)
}

/// The `[audit] file` format: one flattened JSON object per event; the fields of an audit
/// event say whose it is, so no span context.
pub fn audit_file_log<S, W>(writer: W) -> BoxedLayer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    json_lines(writer, false)
}

/// One flattened JSON object per event, with the current span and the span list or
/// without either.
fn json_lines<S, W>(writer: W, spans: bool) -> BoxedLayer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(spans)
        .with_span_list(spans)
        .with_writer(writer)
        .boxed()
}

/// The filter of the main log, from `BULWARK_LOG` (`info` when unset, empty or
/// unreadable). Directives of targets and levels only (`info`, `info,audit=warn`) are
/// matched by `Targets`; `EnvFilter`, needed only for span and field directives
/// (`[conn{client_id=plc-7}]=debug`), keeps track of every span entered and left.
pub fn main_log_filter<S>(spec: Option<&str>) -> BoxedFilter<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let spec = spec
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or("info");
    if let Ok(targets) = spec.parse::<tracing_subscriber::filter::Targets>() {
        return Box::new(targets);
    }
    Box::new(
        tracing_subscriber::EnvFilter::try_new(spec)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    )
}

/// The main log, the audit counts and the audit file, as one layer (see the module docs).
pub struct BrokerLog<S> {
    main: BoxedLayer<S>,
    main_filter: BoxedFilter<S>,
    audit_file: Option<BoxedLayer<S>>,
}

impl<S> BrokerLog<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    /// `main` shows what `main_filter` enables; `audit_file` gets every audit event.
    pub fn new(
        main: BoxedLayer<S>,
        main_filter: BoxedFilter<S>,
        audit_file: Option<BoxedLayer<S>>,
    ) -> BrokerLog<S> {
        BrokerLog {
            main,
            main_filter,
            audit_file,
        }
    }

    /// Calls `f` on the main log and the audit file.
    fn each(&self, mut f: impl FnMut(&BoxedLayer<S>)) {
        f(&self.main);
        if let Some(file) = &self.audit_file {
            f(file);
        }
    }
}

fn is_audit(meta: &Metadata<'_>) -> bool {
    meta.target() == TARGET
}

impl<S> Layer<S> for BrokerLog<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_layer(&mut self, subscriber: &mut S) {
        self.main.on_layer(subscriber);
        if let Some(file) = &mut self.audit_file {
            file.on_layer(subscriber);
        }
    }

    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if is_audit(meta) {
            Interest::always()
        } else {
            self.main_filter.callsite_enabled(meta)
        }
    }

    fn enabled(&self, meta: &Metadata<'_>, cx: Context<'_, S>) -> bool {
        is_audit(meta) || self.main_filter.enabled(meta, &cx)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        // Audit events are INFO, WARN or ERROR (see `audit::TARGET`). The hint also sets
        // the `log` crate's maximum level, so that the debug and trace records of sled and
        // rustls stop at their call sites.
        self.main_filter
            .max_level_hint()
            .map(|main| main.max(LevelFilter::INFO))
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, cx: Context<'_, S>) {
        self.main_filter.on_new_span(attrs, id, cx.clone());
        self.each(|l| l.on_new_span(attrs, id, cx.clone()));
    }

    fn on_record(&self, span: &Id, values: &Record<'_>, cx: Context<'_, S>) {
        self.main_filter.on_record(span, values, cx.clone());
        self.each(|l| l.on_record(span, values, cx.clone()));
    }

    fn on_follows_from(&self, span: &Id, follows: &Id, cx: Context<'_, S>) {
        self.each(|l| l.on_follows_from(span, follows, cx.clone()));
    }

    fn on_event(&self, event: &Event<'_>, cx: Context<'_, S>) {
        let meta = event.metadata();
        if is_audit(meta) {
            AuditCounter.on_event(event, cx.clone());
            if let Some(file) = &self.audit_file {
                file.on_event(event, cx.clone());
            }
        }
        // Any other event got here because the main filter enabled its callsite or the
        // event (`register_callsite`, `enabled`); an audit event got here regardless.
        let shown = !is_audit(meta) || self.main_filter.enabled(meta, &cx);
        if shown && self.main_filter.event_enabled(event, &cx) {
            self.main.on_event(event, cx);
        }
    }

    fn on_enter(&self, id: &Id, cx: Context<'_, S>) {
        self.main_filter.on_enter(id, cx.clone());
        self.each(|l| l.on_enter(id, cx.clone()));
    }

    fn on_exit(&self, id: &Id, cx: Context<'_, S>) {
        self.main_filter.on_exit(id, cx.clone());
        self.each(|l| l.on_exit(id, cx.clone()));
    }

    fn on_close(&self, id: Id, cx: Context<'_, S>) {
        self.main_filter.on_close(id.clone(), cx.clone());
        self.each(|l| l.on_close(id.clone(), cx.clone()));
    }

    fn on_id_change(&self, old: &Id, new: &Id, cx: Context<'_, S>) {
        self.each(|l| l.on_id_change(old, new, cx.clone()));
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::registry::Registry;
    use tracing_subscriber::Layer;

    use super::{audit_file_log, json_log, main_log_filter, BrokerLog};

    /// Lines written by a fmt layer, shared with the test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// Runs `f` with a [`BrokerLog`] whose main log is filtered by `spec`; what the main
    /// log and the audit file got.
    fn logged(spec: &str, f: impl FnOnce()) -> (String, String) {
        let (main, file) = (Captured::default(), Captured::default());
        let layer = BrokerLog::new(
            json_log(main.clone()),
            main_log_filter(Some(spec)),
            Some(audit_file_log(file.clone())),
        );
        tracing::subscriber::with_default(Registry::default().with(layer), f);
        (main.text(), file.text())
    }

    fn emit() {
        let span = tracing::info_span!("conn", client_id = "plc-7");
        let _in = span.enter();
        tracing::info!(target: "audit", event = "connect", "client connected");
        tracing::info!(detail = "m-info", "an info line");
        tracing::debug!(detail = "m-debug", "a debug line");
        tracing::warn!(detail = "m-warn", "a warning");
    }

    #[test]
    fn audit_events_reach_the_file_whatever_the_main_filter() {
        let counted = || {
            crate::audit::counts()
                .snapshot()
                .into_iter()
                .find(|(k, _)| k == "logging_test")
                .map_or(0, |(_, n)| n)
        };
        let before = counted();
        let (main, file) = logged("off", || {
            tracing::info!(target: "audit", event = "logging_test", "counted");
        });
        assert_eq!(counted(), before + 1, "audit counts");
        assert!(
            file.contains("logging_test") && main.is_empty(),
            "{file} / {main}"
        );

        let (main, file) = logged("warn", emit);
        assert!(file.contains("\"event\":\"connect\""), "audit file: {file}");
        assert!(
            !file.contains("m-warn"),
            "only audit events in the file: {file}"
        );
        assert!(main.contains("m-warn"), "main log: {main}");
        assert!(
            !main.contains("m-info") && !main.contains("connect"),
            "main log: {main}"
        );
    }

    #[test]
    fn the_main_log_shows_what_its_filter_enables_with_the_span() {
        let (main, file) = logged("info", emit);
        assert!(
            main.contains("m-info") && main.contains("m-warn"),
            "main log: {main}"
        );
        assert!(main.contains("\"event\":\"connect\""), "main log: {main}");
        assert!(!main.contains("m-debug"), "main log: {main}");
        assert!(
            main.contains("\"client_id\":\"plc-7\""),
            "span fields: {main}"
        );
        assert_eq!(file.lines().count(), 1, "audit file: {file}");

        let (main, _) = logged("info,audit=warn", emit);
        assert!(main.contains("m-info"), "main log: {main}");
        assert!(
            !main.contains("\"event\":\"connect\""),
            "audit=warn: {main}"
        );
    }

    /// The interest a callsite gets is cached for the whole process: an audit callsite
    /// must be `always` even when the main log is off, a debug one `never` under `info`
    /// (a disabled callsite costs nothing on the hot path).
    #[test]
    fn callsite_interest() {
        use tracing::callsite::{Callsite, Identifier};
        use tracing::field::FieldSet;
        use tracing::metadata::Kind;
        use tracing::subscriber::Interest;
        use tracing::{Level, Metadata};

        struct Site(&'static Metadata<'static>);
        impl Callsite for Site {
            fn set_interest(&self, _: Interest) {}
            fn metadata(&self) -> &Metadata<'_> {
                self.0
            }
        }
        macro_rules! site {
            ($target:literal, $level:expr) => {{
                static SITE: Site = Site(&META);
                static META: Metadata<'static> = Metadata::new(
                    "event",
                    $target,
                    $level,
                    None,
                    None,
                    None,
                    FieldSet::new(&[], Identifier(&SITE)),
                    Kind::EVENT,
                );
                &META
            }};
        }
        let log = |spec: &str| -> BrokerLog<Registry> {
            BrokerLog::new(
                tracing_subscriber::fmt::layer().boxed(),
                main_log_filter(Some(spec)),
                None,
            )
        };
        let audit = site!("audit", Level::INFO);
        let debug = site!("bulwark_broker::router", Level::DEBUG);
        let info = site!("bulwark_broker::router", Level::INFO);
        assert!(log("off").register_callsite(audit).is_always());
        assert!(log("off").register_callsite(info).is_never());
        assert!(log("info").register_callsite(debug).is_never());
        assert!(log("info").register_callsite(info).is_always());
        assert!(log("debug").register_callsite(debug).is_always());

        // The most verbose level anything is logged at: what the main log shows, and
        // INFO for the audit events.
        use tracing::level_filters::LevelFilter;
        assert_eq!(log("warn").max_level_hint(), Some(LevelFilter::INFO));
        assert_eq!(log("off").max_level_hint(), Some(LevelFilter::INFO));
        assert_eq!(
            log("info,sled=debug").max_level_hint(),
            Some(LevelFilter::DEBUG)
        );
    }

    #[test]
    fn span_directives_still_filter_by_span() {
        let (main, _) = logged("warn,[conn{client_id=plc-7}]=debug", || {
            emit();
            let other = tracing::info_span!("conn", client_id = "plc-8");
            let _in = other.enter();
            tracing::debug!(detail = "other-debug", "a debug line elsewhere");
        });
        assert!(
            main.contains("m-debug"),
            "debug inside the chosen span: {main}"
        );
        assert!(!main.contains("other-debug"), "debug elsewhere: {main}");
    }

    #[test]
    fn an_empty_or_unreadable_filter_means_info() {
        for spec in ["", "  ", "no=such=level"] {
            let (main, _) = logged(spec, emit);
            assert!(main.contains("m-info"), "{spec:?}: {main}");
            assert!(!main.contains("m-debug"), "{spec:?}: {main}");
        }
    }
}
