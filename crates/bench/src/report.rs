//! The one JSON line a run prints: the fields every scenario shares, then its own.

use serde::Serialize;

/// Fields present on every result line.
#[derive(Debug, Clone, Serialize)]
pub struct Common {
    pub scenario: &'static str,
    /// --label.
    pub broker: String,
    /// "tcp" or "tls".
    pub transport: &'static str,
    /// 0 or 1; null where QoS does not apply.
    pub qos: Option<u8>,
    pub duration_s: f64,
    /// Generator CPU (user + system) over the measured interval, percent of one core.
    pub gen_cpu_pct: f64,
    /// Same for --broker-pid; null without it.
    pub broker_cpu_pct: Option<f64>,
    /// VmRSS of --broker-pid at the end; null without it.
    pub broker_rss_kb: Option<u64>,
    pub timed_out: bool,
}

#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    #[serde(flatten)]
    common: &'a Common,
    #[serde(flatten)]
    fields: &'a T,
}

/// `common` followed by `fields` as one line of JSON (no trailing newline).
pub fn json_line<T: Serialize>(common: &Common, fields: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string(&Line { common, fields })?)
}

/// `x` rounded to 3 decimals (non-finite values become 0).
pub fn round3(x: f64) -> f64 {
    if x.is_finite() {
        (x * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}

/// `count / seconds`, 0 when no time passed.
pub fn rate(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        round3(count as f64 / seconds)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_fields_come_first_and_nulls_are_kept() {
        #[derive(Serialize)]
        struct F {
            sent: u64,
            p50_us: Option<f64>,
        }
        let common = Common {
            scenario: "latency",
            broker: "mosquitto".into(),
            transport: "tcp",
            qos: None,
            duration_s: 1.5,
            gen_cpu_pct: 12.25,
            broker_cpu_pct: None,
            broker_rss_kb: Some(5000),
            timed_out: false,
        };
        let line = json_line(
            &common,
            &F {
                sent: 3,
                p50_us: None,
            },
        )
        .unwrap();
        assert!(
            line.starts_with(r#"{"scenario":"latency","broker":"mosquitto""#),
            "{line}"
        );
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["qos"], serde_json::Value::Null);
        assert_eq!(v["broker_cpu_pct"], serde_json::Value::Null);
        assert_eq!(v["sent"], 3);
        assert_eq!(v["p50_us"], serde_json::Value::Null);
        assert_eq!(v["timed_out"], false);
    }

    #[test]
    fn rounding_and_rates() {
        assert_eq!(round3(1.23456), 1.235);
        assert_eq!(round3(f64::NAN), 0.0);
        assert_eq!(rate(10, 0.0), 0.0);
        assert_eq!(rate(10, 4.0), 2.5);
    }
}
