//! Abuse limits: authentication-failure counters per source address and per username with
//! temporary bans that grow exponentially and always expire, an allow-list that is never
//! banned, a connection-rate limit per address, and token buckets for per-client message
//! and byte rates. Nothing here can lock a user out forever: every ban has an end, and a
//! username ban never outlives `ban_max_secs`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// `[abuse]` in the broker configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AbuseConfig {
    /// Failed logins (per address, and per username) within `failure_window_secs` that
    /// start a ban.
    pub max_auth_failures: u32,
    pub failure_window_secs: u64,
    /// First ban length; each further ban of the same address or user doubles it.
    pub ban_secs: u64,
    /// Longest ban.
    pub ban_max_secs: u64,
    /// Addresses or networks (`10.0.0.0/8`, `::1`) that are never banned or rate limited.
    pub allow_list: Vec<String>,
    /// New connections per second from one address (0: unlimited).
    pub connections_per_sec_per_address: u32,
    /// Burst of new connections one address may make at once.
    pub connection_burst_per_address: u32,
    /// PUBLISH packets per second one client may send (0: unlimited); a client above it is
    /// slowed down (the broker stops reading from it), not disconnected.
    pub messages_per_sec_per_client: u32,
    /// Payload bytes per second one client may publish (0: unlimited).
    pub bytes_per_sec_per_client: u64,
    /// Addresses and usernames tracked at once; the oldest entries are forgotten first.
    pub max_tracked: usize,
}

impl Default for AbuseConfig {
    fn default() -> Self {
        AbuseConfig {
            max_auth_failures: 5,
            failure_window_secs: 300,
            ban_secs: 60,
            ban_max_secs: 3600,
            allow_list: vec!["127.0.0.0/8".into(), "::1".into()],
            connections_per_sec_per_address: 20,
            connection_burst_per_address: 50,
            messages_per_sec_per_client: 2000,
            bytes_per_sec_per_client: 16 * 1024 * 1024,
            max_tracked: 100_000,
        }
    }
}

/// An address or network of the allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn parse(s: &str) -> Result<Network, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or network like 10.0.0.0/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
            None => max,
        };
        Ok(Network { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
struct Record {
    failures: u32,
    window_start: Instant,
    banned_until: Option<Instant>,
    bans: u32,
    last_seen: Instant,
}

impl Record {
    fn new(now: Instant) -> Record {
        Record {
            failures: 0,
            window_start: now,
            banned_until: None,
            bans: 0,
            last_seen: now,
        }
    }
}

/// A ban that just started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Banned {
    Address(IpAddr, Duration),
    User(String, Duration),
}

/// Why a connection attempt is refused before authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    AddressBanned { remaining: Duration },
    UserBanned { remaining: Duration },
}

#[derive(Debug)]
struct RateBucket {
    tokens: f64,
    last: Instant,
}

/// The broker's abuse guard, shared by every listener.
#[derive(Debug)]
pub struct AbuseGuard {
    config: AbuseConfig,
    allow: Vec<Network>,
    addrs: Mutex<HashMap<IpAddr, Record>>,
    users: Mutex<HashMap<String, Record>>,
    conn_rate: Mutex<HashMap<IpAddr, RateBucket>>,
}

fn bounded_insert<K: std::hash::Hash + Eq + Clone, V>(
    map: &mut HashMap<K, V>,
    max: usize,
    key: K,
    make: impl FnOnce() -> V,
    last_seen: impl Fn(&V) -> Instant,
) -> &mut V {
    if !map.contains_key(&key) && map.len() >= max {
        // Forget the entry seen longest ago (a linear scan only when the table is full).
        if let Some(old) = map
            .iter()
            .min_by_key(|(_, v)| last_seen(v))
            .map(|(k, _)| k.clone())
        {
            map.remove(&old);
        }
    }
    map.entry(key).or_insert_with(make)
}

impl AbuseGuard {
    pub fn new(config: AbuseConfig) -> Result<AbuseGuard, String> {
        let allow = config
            .allow_list
            .iter()
            .map(|s| Network::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AbuseGuard {
            config,
            allow,
            addrs: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            conn_rate: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> &AbuseConfig {
        &self.config
    }

    pub fn is_allow_listed(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|n| n.contains(ip))
    }

    /// Connection-rate limit at accept. `false`: refuse this connection.
    pub fn admit_connection(&self, ip: IpAddr, now: Instant) -> bool {
        let rate = self.config.connections_per_sec_per_address;
        if rate == 0 || self.is_allow_listed(ip) {
            return true;
        }
        let burst = f64::from(self.config.connection_burst_per_address.max(1));
        let mut map = self.conn_rate.lock().unwrap_or_else(|p| p.into_inner());
        let b = bounded_insert(
            &mut map,
            self.config.max_tracked,
            ip,
            || RateBucket {
                tokens: burst,
                last: now,
            },
            |b| b.last,
        );
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * f64::from(rate)).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Is this address banned right now?
    pub fn check_address(&self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        if self.is_allow_listed(ip) {
            return Ok(());
        }
        let map = self.addrs.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&ip).and_then(|r| r.banned_until) {
            Some(until) if until > now => Err(Refusal::AddressBanned {
                remaining: until - now,
            }),
            _ => Ok(()),
        }
    }

    /// Is this username banned right now (from any address that is not allow-listed)?
    pub fn check_user(&self, ip: IpAddr, user: &str, now: Instant) -> Result<(), Refusal> {
        if self.is_allow_listed(ip) {
            return Ok(());
        }
        let map = self.users.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(user).and_then(|r| r.banned_until) {
            Some(until) if until > now => Err(Refusal::UserBanned {
                remaining: until - now,
            }),
            _ => Ok(()),
        }
    }

    fn count_failure(&self, rec: &mut Record, now: Instant) -> Option<Duration> {
        let window = Duration::from_secs(self.config.failure_window_secs);
        rec.last_seen = now;
        if now.saturating_duration_since(rec.window_start) > window {
            rec.failures = 0;
            rec.window_start = now;
        }
        rec.failures += 1;
        if rec.failures < self.config.max_auth_failures {
            return None;
        }
        let secs = self
            .config
            .ban_secs
            .saturating_mul(1u64 << rec.bans.min(20))
            .min(self.config.ban_max_secs);
        let ban = Duration::from_secs(secs);
        rec.bans += 1;
        rec.failures = 0;
        rec.window_start = now;
        rec.banned_until = Some(now + ban);
        Some(ban)
    }

    /// Records a failed login from `ip` (as `user`, if one was given). Returns the bans
    /// this failure started.
    pub fn record_failure(&self, ip: IpAddr, user: Option<&str>, now: Instant) -> Vec<Banned> {
        let mut out = Vec::new();
        if self.is_allow_listed(ip) {
            return out;
        }
        {
            let mut map = self.addrs.lock().unwrap_or_else(|p| p.into_inner());
            let rec = bounded_insert(
                &mut map,
                self.config.max_tracked,
                ip,
                || Record::new(now),
                |r| r.last_seen,
            );
            if let Some(d) = self.count_failure(rec, now) {
                out.push(Banned::Address(ip, d));
            }
        }
        if let Some(u) = user {
            let mut map = self.users.lock().unwrap_or_else(|p| p.into_inner());
            let rec = bounded_insert(
                &mut map,
                self.config.max_tracked,
                u.to_string(),
                || Record::new(now),
                |r| r.last_seen,
            );
            if let Some(d) = self.count_failure(rec, now) {
                out.push(Banned::User(u.to_string(), d));
            }
        }
        out
    }

    /// A successful login clears the failure counts (not the ban history) of the address
    /// and the user.
    pub fn record_success(&self, ip: IpAddr, user: Option<&str>) {
        if let Some(r) = self
            .addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&ip)
        {
            r.failures = 0;
        }
        if let Some(u) = user {
            if let Some(r) = self
                .users
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(u)
            {
                r.failures = 0;
            }
        }
    }

    /// Bans in force: (address or username, remaining).
    pub fn bans(&self, now: Instant) -> Vec<(String, Duration)> {
        let mut out = Vec::new();
        for (ip, r) in self.addrs.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if let Some(u) = r.banned_until.filter(|u| *u > now) {
                out.push((ip.to_string(), u - now));
            }
        }
        for (user, r) in self.users.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if let Some(u) = r.banned_until.filter(|u| *u > now) {
                out.push((format!("user:{user}"), u - now));
            }
        }
        out.sort();
        out
    }

    /// Operator ban of an address for `duration`.
    pub fn ban_address(&self, ip: IpAddr, duration: Duration, now: Instant) {
        let mut map = self.addrs.lock().unwrap_or_else(|p| p.into_inner());
        let rec = bounded_insert(
            &mut map,
            self.config.max_tracked,
            ip,
            || Record::new(now),
            |r| r.last_seen,
        );
        rec.banned_until = Some(now + duration);
    }

    /// Lifts a ban of an address (`1.2.3.4`) or a user (`user:NAME`). True if one was lifted.
    pub fn lift(&self, what: &str, now: Instant) -> bool {
        if let Some(user) = what.strip_prefix("user:") {
            let mut map = self.users.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(r) = map
                .get_mut(user)
                .filter(|r| r.banned_until.is_some_and(|u| u > now))
            {
                r.banned_until = None;
                r.failures = 0;
                return true;
            }
            return false;
        }
        let Ok(ip) = what.parse::<IpAddr>() else {
            return false;
        };
        let mut map = self.addrs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = map
            .get_mut(&ip)
            .filter(|r| r.banned_until.is_some_and(|u| u > now))
        {
            r.banned_until = None;
            r.failures = 0;
            return true;
        }
        false
    }
}

/// A token bucket for one client's publish rate: `take` returns how long to wait before
/// reading more from the client.
#[derive(Debug)]
pub struct ClientRate {
    msgs_per_sec: f64,
    bytes_per_sec: f64,
    msgs: f64,
    bytes: f64,
    last: Instant,
}

impl ClientRate {
    pub fn new(config: &AbuseConfig, now: Instant) -> ClientRate {
        let m = f64::from(config.messages_per_sec_per_client);
        let b = config.bytes_per_sec_per_client as f64;
        ClientRate {
            msgs_per_sec: m,
            bytes_per_sec: b,
            msgs: m,
            bytes: b,
            last: now,
        }
    }

    /// Accounts for `msgs` PUBLISH packets carrying `bytes` payload bytes. Returns the pause
    /// needed before reading from the client again (zero when within its rate).
    pub fn take(&mut self, msgs: u64, bytes: u64, now: Instant) -> Duration {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let mut wait: f64 = 0.0;
        if self.msgs_per_sec > 0.0 {
            self.msgs = (self.msgs + dt * self.msgs_per_sec).min(self.msgs_per_sec) - msgs as f64;
            if self.msgs < 0.0 {
                wait = wait.max(-self.msgs / self.msgs_per_sec);
            }
        }
        if self.bytes_per_sec > 0.0 {
            self.bytes =
                (self.bytes + dt * self.bytes_per_sec).min(self.bytes_per_sec) - bytes as f64;
            if self.bytes < 0.0 {
                wait = wait.max(-self.bytes / self.bytes_per_sec);
            }
        }
        Duration::from_secs_f64(wait.min(60.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> AbuseGuard {
        AbuseGuard::new(AbuseConfig {
            max_auth_failures: 3,
            ban_secs: 10,
            ban_max_secs: 35,
            allow_list: vec!["10.1.0.0/16".into()],
            ..AbuseConfig::default()
        })
        .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_match() {
        let n = Network::parse("10.1.0.0/16").unwrap();
        assert!(n.contains(ip("10.1.200.3")));
        assert!(!n.contains(ip("10.2.0.1")));
        assert!(n.contains(ip("::ffff:10.1.0.9")), "IPv4-mapped IPv6");
        assert!(Network::parse("::1").unwrap().contains(ip("::1")));
        assert!(Network::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Network::parse("10.0.0.0/33").is_err());
        assert!(Network::parse("bogus").is_err());
    }

    #[test]
    fn failures_ban_with_exponential_backoff_that_expires() {
        let g = guard();
        let t0 = Instant::now();
        let a = ip("192.0.2.7");
        assert!(g.record_failure(a, None, t0).is_empty());
        assert!(g.record_failure(a, None, t0).is_empty());
        assert_eq!(
            g.record_failure(a, None, t0),
            vec![Banned::Address(a, Duration::from_secs(10))]
        );
        assert!(matches!(
            g.check_address(a, t0),
            Err(Refusal::AddressBanned { .. })
        ));
        assert!(
            g.check_address(ip("192.0.2.8"), t0).is_ok(),
            "other addresses unaffected"
        );
        let t1 = t0 + Duration::from_secs(11);
        assert!(g.check_address(a, t1).is_ok(), "bans expire");
        for _ in 0..2 {
            g.record_failure(a, None, t1);
        }
        assert_eq!(
            g.record_failure(a, None, t1),
            vec![Banned::Address(a, Duration::from_secs(20))],
            "second ban doubles"
        );
        let t2 = t1 + Duration::from_secs(21);
        for _ in 0..2 {
            g.record_failure(a, None, t2);
        }
        assert_eq!(
            g.record_failure(a, None, t2),
            vec![Banned::Address(a, Duration::from_secs(35))],
            "capped at ban_max_secs"
        );
    }

    #[test]
    fn user_bans_expire_and_allow_list_is_exempt() {
        let g = guard();
        let t0 = Instant::now();
        for i in 0..3 {
            g.record_failure(ip(&format!("198.51.100.{i}")), Some("op"), t0);
        }
        assert!(matches!(
            g.check_user(ip("203.0.113.1"), "op", t0),
            Err(Refusal::UserBanned { .. })
        ));
        assert!(
            g.check_user(ip("10.1.2.3"), "op", t0).is_ok(),
            "allow-listed address"
        );
        assert!(g
            .check_user(ip("203.0.113.1"), "op", t0 + Duration::from_secs(11))
            .is_ok());
        let allowed = ip("10.1.9.9");
        for _ in 0..10 {
            assert!(g.record_failure(allowed, None, t0).is_empty());
        }
        assert!(g.check_address(allowed, t0).is_ok());
    }

    #[test]
    fn success_resets_failure_count_and_operators_can_lift() {
        let g = guard();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        g.record_failure(a, Some("u"), t0);
        g.record_failure(a, Some("u"), t0);
        g.record_success(a, Some("u"));
        assert!(g.record_failure(a, Some("u"), t0).is_empty());
        g.ban_address(a, Duration::from_secs(100), t0);
        assert_eq!(g.bans(t0).len(), 1);
        assert!(g.lift("192.0.2.1", t0));
        assert!(g.check_address(a, t0).is_ok());
        assert!(!g.lift("192.0.2.1", t0), "nothing left to lift");
    }

    #[test]
    fn connection_rate_limits_per_address() {
        let g = AbuseGuard::new(AbuseConfig {
            connections_per_sec_per_address: 2,
            connection_burst_per_address: 3,
            allow_list: vec![],
            ..AbuseConfig::default()
        })
        .unwrap();
        let t0 = Instant::now();
        let a = ip("192.0.2.5");
        assert!((0..3).all(|_| g.admit_connection(a, t0)));
        assert!(!g.admit_connection(a, t0), "burst used up");
        assert!(g.admit_connection(ip("192.0.2.6"), t0), "per address");
        assert!(
            g.admit_connection(a, t0 + Duration::from_millis(600)),
            "refills at 2/s"
        );
    }

    #[test]
    fn tracking_tables_are_bounded() {
        let g = AbuseGuard::new(AbuseConfig {
            max_tracked: 10,
            allow_list: vec![],
            ..AbuseConfig::default()
        })
        .unwrap();
        let t0 = Instant::now();
        for i in 0..1000u32 {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            g.record_failure(
                a,
                Some(&format!("u{i}")),
                t0 + Duration::from_millis(u64::from(i)),
            );
            g.admit_connection(a, t0);
        }
        assert!(g.addrs.lock().unwrap().len() <= 10);
        assert!(g.users.lock().unwrap().len() <= 10);
        assert!(g.conn_rate.lock().unwrap().len() <= 10);
    }

    #[test]
    fn client_rate_asks_for_pauses() {
        let cfg = AbuseConfig {
            messages_per_sec_per_client: 10,
            bytes_per_sec_per_client: 0,
            ..AbuseConfig::default()
        };
        let t0 = Instant::now();
        let mut r = ClientRate::new(&cfg, t0);
        assert_eq!(r.take(10, 100, t0), Duration::ZERO);
        let w = r.take(5, 0, t0);
        assert!((w.as_secs_f64() - 0.5).abs() < 0.01, "{w:?}");
        let unlimited = AbuseConfig {
            messages_per_sec_per_client: 0,
            bytes_per_sec_per_client: 0,
            ..AbuseConfig::default()
        };
        let mut r = ClientRate::new(&unlimited, t0);
        assert_eq!(r.take(1_000_000, 1 << 40, t0), Duration::ZERO);
    }
}
