//! Exposure self-check: proof that the gateway accepts no connection from the network.
//!
//! The agent never binds a TCP or UDP socket (DESIGN.md: "the agent never binds a TCP or
//! UDP socket"). This module lets it prove that, and lets it report what *else* on the host
//! is reachable from the network:
//!
//! - [`listening_sockets`] reads the kernel's socket tables (`/proc/net/{tcp,tcp6,udp,udp6}`)
//!   and returns every listening TCP socket (state `0A`) and every bound, unconnected UDP
//!   socket (state `07`, remote address zero);
//! - [`exposed`] keeps those that are not bound to a loopback address, i.e. that the network
//!   can reach; [`ExposureReport`] turns them into what `bulwark-agent exposure` prints and
//!   what the health report carries;
//! - [`own_listening_sockets`] finds the listening sockets held by one process, by matching
//!   its `/proc/<pid>/fd/*` links (`socket:[INODE]`) against the tables.
//!
//! The tables are those of the reading process's network namespace: run in the host's
//! namespace (as the systemd unit does) they describe the host.

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use serde::Serialize;

/// Which kernel table a socket came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Tcp6,
    Udp,
    Udp6,
}

impl Proto {
    /// The four tables, in the order they are read.
    pub const ALL: [Proto; 4] = [Proto::Tcp, Proto::Tcp6, Proto::Udp, Proto::Udp6];

    /// The name of the table under `/proc/net`, which is also how the protocol is shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Tcp6 => "tcp6",
            Proto::Udp => "udp",
            Proto::Udp6 => "udp6",
        }
    }

    fn is_tcp(self) -> bool {
        matches!(self, Proto::Tcp | Proto::Tcp6)
    }

    fn is_v6(self) -> bool {
        matches!(self, Proto::Tcp6 | Proto::Udp6)
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A listening TCP socket or a bound, unconnected UDP socket.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ListeningSocket {
    pub proto: Proto,
    /// The local address; `0.0.0.0` / `::` mean every interface.
    pub addr: SocketAddr,
    /// The socket's inode, as in `/proc/<pid>/fd/N -> socket:[INODE]`.
    pub inode: u64,
    /// The owner's user id.
    pub uid: u32,
}

impl ListeningSocket {
    /// True when only this host can reach the socket: 127.0.0.0/8, `::1` or an
    /// IPv4-mapped loopback address (`::ffff:127.x.x.x`).
    pub fn is_loopback(&self) -> bool {
        is_loopback_ip(self.addr.ip())
    }

    /// One line for people, e.g. `tcp 0.0.0.0:22 (uid 0)`.
    pub fn describe(&self) -> String {
        format!("{} {} (uid {})", self.proto, self.addr, self.uid)
    }
}

/// 127.0.0.0/8, `::1` and `::ffff:127.0.0.0/104`.
pub fn is_loopback_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_loopback(),
        IpAddr::V6(a) => a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// A line of a `/proc/net` table that does not have the expected layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("/proc/net/{proto} line {line}: {reason}: {text:?}")]
pub struct ParseError {
    pub proto: Proto,
    /// 1-based line number (the header is line 1).
    pub line: usize,
    /// The offending line (cut to 200 characters).
    pub text: String,
    pub reason: String,
}

/// TCP_LISTEN in the kernel's `st` column.
const TCP_LISTEN: u8 = 0x0A;
/// TCP_CLOSE: what an unconnected UDP socket shows.
const UDP_UNCONNECTED: u8 = 0x07;

/// Parses the text of `/proc/net/<proto>` and returns its listening sockets.
///
/// Every line is checked, listening or not, so a table in an unexpected format is an error
/// rather than a silently empty result. The header line (starting with `sl`) and blank lines
/// are skipped.
///
/// Addresses are printed by the kernel as the raw in-memory 32-bit words of the address
/// (`%08X`), so on a little-endian host `127.0.0.1` is `0100007F` and each of the four words
/// of an IPv6 address is byte-swapped; they are decoded in native byte order, which is right
/// on every host. Ports are printed in host order and need no swapping.
pub fn parse_proc_net(text: &str, proto: Proto) -> Result<Vec<ListeningSocket>, ParseError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let fail = |reason: String| ParseError {
            proto,
            line: i + 1,
            text: line.trim().chars().take(200).collect(),
            reason,
        };
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            continue; // blank line
        };
        if first == "sl" {
            continue; // header
        }
        if !first
            .strip_suffix(':')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(fail(format!(
                "slot {first:?} is not a number followed by ':'"
            )));
        }
        // sl local rem st tx:rx tr:tm retrnsmt uid timeout inode ...
        let rest: Vec<&str> = fields.take(9).collect();
        if rest.len() < 9 {
            return Err(fail(format!(
                "{} fields, expected at least 10",
                rest.len() + 1
            )));
        }
        let local = parse_endpoint(rest[0], proto.is_v6())
            .map_err(|e| fail(format!("local address: {e}")))?;
        let remote = parse_endpoint(rest[1], proto.is_v6())
            .map_err(|e| fail(format!("remote address: {e}")))?;
        let state = parse_hex_exact(rest[2], 2)
            .map(|s| s as u8)
            .map_err(|e| fail(format!("state: {e}")))?;
        let uid: u32 = parse_decimal(rest[6]).map_err(|e| fail(format!("uid: {e}")))?;
        let inode: u64 = parse_decimal(rest[8]).map_err(|e| fail(format!("inode: {e}")))?;
        let listening = if proto.is_tcp() {
            state == TCP_LISTEN
        } else {
            state == UDP_UNCONNECTED && remote.ip().is_unspecified() && remote.port() == 0
        };
        if listening {
            out.push(ListeningSocket {
                proto,
                addr: local,
                inode,
                uid,
            });
        }
    }
    Ok(out)
}

fn parse_decimal<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{s:?} is not a decimal number"));
    }
    s.parse().map_err(|_| format!("{s:?} is out of range"))
}

/// `len` hex digits (no sign, no prefix) as a u32.
fn parse_hex_exact(s: &str, len: usize) -> Result<u32, String> {
    if s.len() != len || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{s:?} is not {len} hex digits"));
    }
    u32::from_str_radix(s, 16).map_err(|e| format!("{s:?}: {e}"))
}

/// `ADDR:PORT` with ADDR 8 (IPv4) or 32 (IPv6) hex digits and PORT 4 hex digits.
fn parse_endpoint(s: &str, v6: bool) -> Result<SocketAddr, String> {
    let (addr, port) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} has no ':' between address and port"))?;
    let port = parse_hex_exact(port, 4)? as u16;
    let ip = if v6 {
        if addr.len() != 32 {
            return Err(format!("{addr:?} is not 32 hex digits"));
        }
        let mut bytes = [0u8; 16];
        for (w, chunk) in bytes.chunks_exact_mut(4).enumerate() {
            let word = parse_hex_exact(&addr[w * 8..w * 8 + 8], 8)?;
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        IpAddr::V4(Ipv4Addr::from(parse_hex_exact(addr, 8)?.to_ne_bytes()))
    };
    Ok(SocketAddr::new(ip, port))
}

/// Reads the four tables under `dir` (`/proc/net` or `/proc/<pid>/net`). A missing table
/// (IPv6 disabled, say) counts as empty.
fn read_tables(dir: &Path) -> io::Result<Vec<ListeningSocket>> {
    let mut out = Vec::new();
    for proto in Proto::ALL {
        let path = dir.join(proto.as_str());
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        };
        let mut found = parse_proc_net(&text, proto)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        out.append(&mut found);
    }
    sort(&mut out);
    Ok(out)
}

fn sort(v: &mut [ListeningSocket]) {
    v.sort_by(|a, b| {
        (a.proto, a.addr.port(), a.addr.ip(), a.inode).cmp(&(
            b.proto,
            b.addr.port(),
            b.addr.ip(),
            b.inode,
        ))
    });
}

/// Every listening TCP socket and bound, unconnected UDP socket on the host (its network
/// namespace), loopback or not.
pub fn listening_sockets() -> io::Result<Vec<ListeningSocket>> {
    read_tables(Path::new("/proc/net"))
}

/// The listening sockets that the network can reach (not bound to a loopback address).
pub fn exposed() -> io::Result<Vec<ListeningSocket>> {
    let mut all = listening_sockets()?;
    all.retain(|s| !s.is_loopback());
    Ok(all)
}

/// The listening TCP/UDP sockets (loopback ones included) that process `pid` holds open.
///
/// Reading another user's process needs privileges; for the agent itself
/// (`std::process::id()`) it always works. An empty result is the proof that the process
/// listens on no TCP or UDP port.
pub fn own_listening_sockets(pid: u32) -> io::Result<Vec<ListeningSocket>> {
    let inodes = socket_inodes(pid)?;
    let mut all = read_tables(&Path::new("/proc").join(pid.to_string()).join("net"))?;
    all.retain(|s| inodes.contains(&s.inode));
    Ok(all)
}

/// Inodes of the sockets among a process's open file descriptors.
fn socket_inodes(pid: u32) -> io::Result<HashSet<u64>> {
    let dir = Path::new("/proc").join(pid.to_string()).join("fd");
    let entries = fs::read_dir(&dir)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
    let mut out = HashSet::new();
    for entry in entries {
        let entry = entry?;
        let target = match fs::read_link(entry.path()) {
            Ok(t) => t,
            // The descriptor was closed between listing and reading it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{}: {e}", entry.path().display()),
                ))
            }
        };
        if let Some(inode) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok())
        {
            out.insert(inode);
        }
    }
    Ok(out)
}

/// One network-reachable socket in an [`ExposureReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExposedSocket {
    #[serde(flatten)]
    pub socket: ListeningSocket,
    /// e.g. `tcp 0.0.0.0:22 (uid 0)`.
    pub description: String,
}

/// What `bulwark-agent exposure` prints and what the health report carries: the listening
/// sockets the network can reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExposureReport {
    /// Network-reachable listening sockets, sorted by protocol, port and address.
    pub exposed: Vec<ExposedSocket>,
    /// How many loopback-only listening sockets were seen (allowed, not listed).
    pub loopback_only: usize,
}

impl ExposureReport {
    /// Reads the host's tables now.
    pub fn collect() -> io::Result<ExposureReport> {
        Ok(ExposureReport::from_sockets(listening_sockets()?))
    }

    /// Builds a report from listening sockets (loopback ones are counted, not listed).
    pub fn from_sockets(sockets: impl IntoIterator<Item = ListeningSocket>) -> ExposureReport {
        let (loopback, mut exposed): (Vec<_>, Vec<_>) =
            sockets.into_iter().partition(ListeningSocket::is_loopback);
        sort(&mut exposed);
        ExposureReport {
            exposed: exposed
                .into_iter()
                .map(|socket| ExposedSocket {
                    description: socket.describe(),
                    socket,
                })
                .collect(),
            loopback_only: loopback.len(),
        }
    }

    /// True when nothing is reachable from the network.
    pub fn is_clean(&self) -> bool {
        self.exposed.is_empty()
    }

    /// Logs the network-reachable sockets as a `host_exposed` audit event, if there are any.
    pub fn audit(&self) {
        if !self.is_clean() {
            tracing::warn!(
                target: "audit",
                event = "host_exposed",
                sockets = %self.exposed.iter().map(|s| s.description.as_str()).collect::<Vec<_>>().join(", "),
                "this gateway has listening sockets that the network can reach; an edge gateway should have none"
            );
        }
    }
}

impl fmt::Display for ExposureReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.exposed.is_empty() {
            write!(
                f,
                "no network-reachable listening sockets (TCP and UDP, IPv4 and IPv6)"
            )?;
        } else {
            let n = self.exposed.len();
            writeln!(
                f,
                "{n} network-reachable listening socket{}:",
                if n == 1 { "" } else { "s" }
            )?;
            for (i, s) in self.exposed.iter().enumerate() {
                if i > 0 {
                    writeln!(f)?;
                }
                write!(f, "  {}", s.description)?;
            }
        }
        if self.loopback_only > 0 {
            write!(
                f,
                "\n({} loopback-only listening socket{} not counted)",
                self.loopback_only,
                if self.loopback_only == 1 { "" } else { "s" }
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, UdpSocket};

    // Captured from Linux hosts (x86_64, little-endian).
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 21378 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0277 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 19950 1 0000000000000000 100 0 0 10 0
   2: 3500007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 18320 1 0000000000000000 100 0 0 10 5
   3: 0F02000A:0016 0202000A:D4B6 01 00000000:00000000 02:0009E3F4 00000000     0        0 40211 2 0000000000000000 20 4 31 10 -1
   4: 0F02000A:A1C2 2D0EDBC6:01BB 06 00000000:00000000 03:0000117A 00000000     0        0 0 3 0000000000000000
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 21380 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:0277 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 19949 1 0000000000000000 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 55001 1 0000000000000000 100 0 0 10 0
   3: B80D01200000000000000000050000C0:20FB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 55002 1 0000000000000000 100 0 0 10 0
   4: 0000000000000000FFFF00000F02000A:0016 0000000000000000FFFF00000202000A:D4B8 01 00000000:00000000 02:000A1A2B 00000000     0        0 55010 2 0000000000000000 20 4 29 10 -1
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  329: 3500007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 18319 2 0000000000000000 0
  344: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 20133 2 0000000000000000 0
  511: 00000000:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000   104        0 20519 2 0000000000000000 0
  986: 0F02000A:E0D7 08080808:0035 01 00000000:00000000 00:00000000 00000000  1000        0 60400 2 0000000000000000 0
";
    const UDP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  511: 00000000000000000000000000000000:14E9 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000   104        0 20520 2 0000000000000000 0
  546: 000080FE00000000FF5E2D0227F9BBFE:0222 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 20888 2 0000000000000000 0
  600: 00000000000000000000000001000000:B1A3 00000000000000000000000001000000:0035 01 00000000:00000000 00:00000000 00000000  1000        0 60401 2 0000000000000000 0
";

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn parses_tcp() {
        let v = parse_proc_net(TCP, Proto::Tcp).unwrap();
        let got: Vec<_> = v.iter().map(|s| (s.addr, s.inode, s.uid)).collect();
        assert_eq!(
            got,
            vec![
                (sa("0.0.0.0:22"), 21378, 0),
                (sa("127.0.0.1:631"), 19950, 0),
                (sa("127.0.0.53:53"), 18320, 101),
            ]
        );
        assert!(v.iter().all(|s| s.proto == Proto::Tcp));
        assert!(!v[0].is_loopback());
        assert!(v[1].is_loopback() && v[2].is_loopback());
        assert_eq!(v[0].describe(), "tcp 0.0.0.0:22 (uid 0)");
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn parses_tcp6_word_order() {
        let v = parse_proc_net(TCP6, Proto::Tcp6).unwrap();
        let got: Vec<_> = v.iter().map(|s| (s.addr, s.inode, s.uid)).collect();
        assert_eq!(
            got,
            vec![
                (sa("[::]:22"), 21380, 0),
                (sa("[::1]:631"), 19949, 0),
                (sa("[::ffff:127.0.0.1]:8080"), 55001, 1000),
                (sa("[2001:db8::c000:5]:8443"), 55002, 1000),
            ]
        );
        let loopback: Vec<bool> = v.iter().map(ListeningSocket::is_loopback).collect();
        assert_eq!(loopback, vec![false, true, true, false]);
        assert_eq!(v[0].describe(), "tcp6 [::]:22 (uid 0)");
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn parses_udp_and_udp6() {
        let v = parse_proc_net(UDP, Proto::Udp).unwrap();
        let got: Vec<_> = v.iter().map(|s| (s.addr, s.uid)).collect();
        // The connected socket (state 01, remote 8.8.8.8:53) is not listed.
        assert_eq!(
            got,
            vec![
                (sa("127.0.0.53:53"), 101),
                (sa("0.0.0.0:68"), 0),
                (sa("0.0.0.0:5353"), 104),
            ]
        );
        let v = parse_proc_net(UDP6, Proto::Udp6).unwrap();
        let got: Vec<_> = v.iter().map(|s| (s.addr, s.inode)).collect();
        assert_eq!(
            got,
            vec![
                (sa("[::]:5353"), 20520),
                (sa("[fe80::22d:5eff:febb:f927]:546"), 20888)
            ]
        );
        assert!(v.iter().all(|s| !s.is_loopback()));
    }

    #[test]
    fn header_and_blank_lines_only() {
        assert!(parse_proc_net("", Proto::Tcp).unwrap().is_empty());
        let header = TCP.lines().next().unwrap();
        assert!(parse_proc_net(&format!("{header}\n\n"), Proto::Tcp)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn malformed_lines_name_the_line() {
        let header = TCP.lines().next().unwrap();
        let good = TCP.lines().nth(1).unwrap();
        let cases: &[(&str, Proto, &str)] = &[
            ("   0: 00000000:0016 00000000:0000 0A", Proto::Tcp, "fields"),
            (
                "   0: 0000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 21378 1",
                Proto::Tcp,
                "local address",
            ),
            (
                "   0: 00000000:0016 00000000-0000 0A 00000000:00000000 00:00000000 00000000     0        0 21378 1",
                Proto::Tcp,
                "remote address",
            ),
            (
                "   0: 0000000G:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 21378 1",
                Proto::Tcp,
                "local address",
            ),
            (
                "   0: +0000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 21378 1",
                Proto::Tcp,
                "local address",
            ),
            (
                "   0: 00000000:0016 00000000:0000 XY 00000000:00000000 00:00000000 00000000     0        0 21378 1",
                Proto::Tcp,
                "state",
            ),
            (
                "   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000    -1        0 21378 1",
                Proto::Tcp,
                "uid",
            ),
            (
                "   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 abc 1",
                Proto::Tcp,
                "inode",
            ),
            (
                "   x: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 21378 1",
                Proto::Tcp,
                "slot",
            ),
            // An IPv4 line in an IPv6 table.
            (good, Proto::Tcp6, "32 hex digits"),
        ];
        for (line, proto, what) in cases {
            let text = format!("{header}\n{good}\n{line}\n");
            let text = if *proto == Proto::Tcp6 {
                format!("{header}\n{line}\n")
            } else {
                text
            };
            let err = parse_proc_net(&text, *proto).unwrap_err();
            let expect_line = if *proto == Proto::Tcp6 { 2 } else { 3 };
            assert_eq!(err.line, expect_line, "{line}: {err}");
            let msg = err.to_string();
            assert!(msg.contains(what), "{line}: {msg}");
            assert!(
                msg.starts_with(&format!("/proc/net/{proto} line {expect_line}: ")),
                "{msg}"
            );
            assert!(msg.contains(line.trim()), "{msg}");
        }
    }

    #[test]
    fn loopback_rules() {
        let lo = |s: &str| is_loopback_ip(s.parse().unwrap());
        assert!(lo("127.0.0.1"));
        assert!(lo("127.255.0.9"));
        assert!(lo("::1"));
        assert!(lo("::ffff:127.0.0.1"));
        assert!(!lo("0.0.0.0"));
        assert!(!lo("::"));
        assert!(!lo("10.0.0.1"));
        assert!(!lo("::ffff:10.0.0.1"));
        assert!(!lo("fe80::1"));
        assert!(!lo("128.0.0.1"));
    }

    fn sock(proto: Proto, addr: &str, uid: u32) -> ListeningSocket {
        ListeningSocket {
            proto,
            addr: sa(addr),
            inode: 1,
            uid,
        }
    }

    #[test]
    fn report_display_and_json() {
        let clean = ExposureReport::from_sockets(vec![sock(Proto::Tcp, "127.0.0.1:9100", 0)]);
        assert!(clean.is_clean());
        let text = clean.to_string();
        assert!(
            text.starts_with("no network-reachable listening sockets"),
            "{text}"
        );
        assert!(text.contains("1 loopback-only listening socket not counted"));
        assert_eq!(
            ExposureReport::from_sockets(vec![]).to_string(),
            "no network-reachable listening sockets (TCP and UDP, IPv4 and IPv6)"
        );

        let report = ExposureReport::from_sockets(vec![
            sock(Proto::Udp6, "[::]:5353", 104),
            sock(Proto::Tcp, "0.0.0.0:22", 0),
            sock(Proto::Tcp6, "[::1]:631", 0),
        ]);
        assert!(!report.is_clean());
        assert_eq!(
            report.to_string(),
            "2 network-reachable listening sockets:\n  tcp 0.0.0.0:22 (uid 0)\n  udp6 [::]:5353 (uid 104)\n(1 loopback-only listening socket not counted)"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "exposed": [
                    {"proto": "tcp", "addr": "0.0.0.0:22", "inode": 1, "uid": 0,
                     "description": "tcp 0.0.0.0:22 (uid 0)"},
                    {"proto": "udp6", "addr": "[::]:5353", "inode": 1, "uid": 104,
                     "description": "udp6 [::]:5353 (uid 104)"}
                ],
                "loopback_only": 1
            })
        );
    }

    /// The real tables: a listener planted in this process is reported and attributed to it.
    #[test]
    fn planted_listeners_are_reported() {
        let tcp = TcpListener::bind("0.0.0.0:0").unwrap();
        let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
        let local = TcpListener::bind("127.0.0.1:0").unwrap();
        let local_udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (tp, up) = (
            tcp.local_addr().unwrap().port(),
            udp.local_addr().unwrap().port(),
        );
        let (lp, lup) = (
            local.local_addr().unwrap().port(),
            local_udp.local_addr().unwrap().port(),
        );

        let exposed = exposed().unwrap();
        let has = |v: &[ListeningSocket], proto: Proto, ip: &str, port: u16| {
            v.iter()
                .any(|s| s.proto == proto && s.addr == SocketAddr::new(ip.parse().unwrap(), port))
        };
        assert!(has(&exposed, Proto::Tcp, "0.0.0.0", tp), "{exposed:?}");
        assert!(has(&exposed, Proto::Udp, "0.0.0.0", up), "{exposed:?}");
        assert!(!exposed
            .iter()
            .any(|s| s.addr.port() == lp && s.proto == Proto::Tcp));
        assert!(!exposed
            .iter()
            .any(|s| s.addr.port() == lup && s.proto == Proto::Udp));

        let all = listening_sockets().unwrap();
        assert!(has(&all, Proto::Tcp, "127.0.0.1", lp));
        assert!(has(&all, Proto::Udp, "127.0.0.1", lup));

        let own = own_listening_sockets(std::process::id()).unwrap();
        for (proto, ip, port) in [
            (Proto::Tcp, "0.0.0.0", tp),
            (Proto::Udp, "0.0.0.0", up),
            (Proto::Tcp, "127.0.0.1", lp),
            (Proto::Udp, "127.0.0.1", lup),
        ] {
            assert!(
                has(&own, proto, ip, port),
                "{proto} {ip}:{port} not in {own:?}"
            );
        }

        let report = ExposureReport::collect().unwrap();
        let text = report.to_string();
        assert!(text.contains(&format!("tcp 0.0.0.0:{tp} (uid ")), "{text}");
        assert!(text.contains(&format!("udp 0.0.0.0:{up} (uid ")), "{text}");
        assert!(!text.contains(&format!("127.0.0.1:{lp}")), "{text}");

        // Once closed, they are gone from this process's list.
        drop((tcp, udp, local, local_udp));
        let own = own_listening_sockets(std::process::id()).unwrap();
        assert!(!has(&own, Proto::Tcp, "0.0.0.0", tp), "{own:?}");
        assert!(!has(&own, Proto::Udp, "0.0.0.0", up), "{own:?}");
    }

    /// IPv6 listeners decode to the right address, where the host has IPv6.
    #[test]
    fn planted_ipv6_listeners() {
        let Ok(any) = TcpListener::bind("[::]:0") else {
            return; // no IPv6 here
        };
        let port = any.local_addr().unwrap().port();
        let exposed = exposed().unwrap();
        assert!(
            exposed
                .iter()
                .any(|s| s.proto == Proto::Tcp6 && s.addr == sa(&format!("[::]:{port}"))),
            "{exposed:?}"
        );
        if let Ok(lo) = TcpListener::bind("[::1]:0") {
            let port = lo.local_addr().unwrap().port();
            assert!(!super::exposed()
                .unwrap()
                .iter()
                .any(|s| s.addr.port() == port));
            assert!(listening_sockets()
                .unwrap()
                .iter()
                .any(|s| s.proto == Proto::Tcp6 && s.addr == sa(&format!("[::1]:{port}"))));
        }
    }

    #[test]
    fn no_such_process() {
        assert!(own_listening_sockets(u32::MAX).is_err());
    }
}
