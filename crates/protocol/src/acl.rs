//! The ACL engine: one model for connect, publish, subscribe, delivery and tunnels.
//!
//! The file syntax is Mosquitto's, so existing deployments move over, plus one extension:
//!
//! ```text
//! # comment; blank lines are ignored, so is whitespace around a line
//! topic [read|write|readwrite|deny] FILTER    # access defaults to readwrite
//! user NAME                                   # NAME is the rest of the line
//! pattern [read|write|readwrite|deny] FILTER  # every authenticated identity; %u, %c
//! clientid PATTERN                            # under `user`: exact, %u, trailing '*'
//! ```
//!
//! (Comments are whole lines only: `#` is also the multi-level wildcard.)
//!
//! - `topic` lines before the first `user` line apply to anonymous clients only; after a
//!   `user NAME` line they apply to identity NAME. Several blocks of one NAME add up.
//! - `pattern` lines apply to every authenticated identity wherever they appear (as in
//!   Mosquitto), never to anonymous clients. `%u` is the identity, `%c` the client id.
//!   A value that is empty or contains `+`, `#`, `/` or U+0000 never makes a pattern grant
//!   anything (CVE-2017-7650), nor does one that starts with `$` where it would begin the
//!   filter (an identity `$SYS` must not turn `%u/#` into `$SYS/#`). A `deny` pattern that
//!   cannot be substituted safely fails closed: it denies everything to that principal.
//! - Default deny. `deny` wins over every grant, wherever it appears.
//! - `$` topics follow MQTT matching (a first-level wildcard never matches them), so reading
//!   `$SYS` needs an explicit grant. Publishing to a `$` topic is always refused; the one
//!   `$` rule that grants something is write on `$tunnel/DEVICE/open/SERVICE`, which is the
//!   permission to open a tunnel ([`AclFile::check_tunnel`]).
//! - Connect: an identity's client id must equal the identity unless its `user` block has
//!   `clientid` lines, in which case one of them must match (`clientid *` allows any).
//! - Subscribe: the filter must be contained in one read grant ([`filter_contains`]) and
//!   must not intersect any deny ([`filters_intersect`]), so every topic it can deliver is
//!   readable.
//!
//! Every decision names the rule that made it ([`Decision::rule`], [`AclFile::explain`]).
//! A line that does not parse is an [`AclError`] naming the line; nothing is skipped.

use std::collections::HashMap;
use std::fmt;

use crate::topic::{TopicFilter, TopicName, MAX_TOPIC_LEN};

/// Documented defaults for devices, following the topic table of DESIGN.md: a device
/// writes its own data, status (retained, and its will), health, command results and
/// audit records, and reads its own commands and tunnel notifications.
pub const DEFAULT_DEVICE_RULES: &str = "\
# Bulwark default device rules (identity = device id).
pattern write devices/%u/data/#
pattern write devices/%u/status
pattern write devices/%u/health
pattern write devices/%u/cmd-result/#
pattern write devices/%u/audit
pattern read devices/%u/cmd/#
pattern read $tunnel/%u/notify
";

/// Who is asking: an authenticated identity (`None` = anonymous) and its client id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal<'a> {
    pub identity: Option<&'a str>,
    pub client_id: &'a str,
}

impl<'a> Principal<'a> {
    /// An authenticated identity connected with `client_id`.
    pub fn user(identity: &'a str, client_id: &'a str) -> Self {
        Principal {
            identity: Some(identity),
            client_id,
        }
    }
    /// An anonymous client.
    pub fn anonymous(client_id: &'a str) -> Self {
        Principal {
            identity: None,
            client_id,
        }
    }
}

/// The access word of a `topic` or `pattern` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn parse(word: &str) -> Option<Access> {
        match word {
            "read" => Some(Access::Read),
            "write" => Some(Access::Write),
            "readwrite" => Some(Access::ReadWrite),
            "deny" => Some(Access::Deny),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::ReadWrite => "readwrite",
            Access::Deny => "deny",
        }
    }
}

/// The rule that decided: its line number (1-based) and its text as written (trimmed).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RuleRef {
    pub line: usize,
    pub text: String,
}

/// Why a [`Decision`] came out the way it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// Allowed by the grant (or `clientid` line) in [`Decision::rule`].
    Granted,
    /// Refused by the `deny` rule in [`Decision::rule`].
    Denied,
    /// Refused by the `deny` pattern in [`Decision::rule`], which could not be substituted
    /// safely for this identity or client id and therefore denies everything.
    DeniedUnsafeSubstitution,
    /// No rule grants it (default deny).
    NoGrant,
    /// Clients never publish to `$` topics.
    DollarTopic,
    /// A tunnel device or service name is empty or contains `+`, `#`, `/` or U+0000.
    InvalidTunnelName,
    /// Anonymous connections are the broker's (listener's) decision, not the ACL's.
    AnonymousConnect,
    /// The client id equals the identity and the user has no `clientid` lines.
    ClientIdIsIdentity,
    /// The client id differs from the identity and the user has no `clientid` lines.
    ClientIdMismatch,
    /// The user has `clientid` lines and none matches the client id.
    ClientIdNotListed,
}

/// The outcome of a check: allowed or not, and which rule decided (`None` for the
/// built-in reasons, chiefly default deny).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub rule: Option<RuleRef>,
    pub reason: Reason,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allowed { "allowed" } else { "denied" };
        if let Some(rule) = &self.rule {
            write!(f, "{verdict} by line {}: `{}`", rule.line, rule.text)?;
            if self.reason == Reason::DeniedUnsafeSubstitution {
                f.write_str(
                    " (the identity or client id is empty, contains '+', '#' or '/', or is \
                     too long, so this deny pattern covers everything)",
                )?;
            }
            return Ok(());
        }
        let why = match self.reason {
            Reason::DollarTopic => "clients never publish to `$` topics",
            Reason::InvalidTunnelName => {
                "tunnel device and service names must be non-empty and must not contain \
                 '+', '#' or '/'"
            }
            Reason::AnonymousConnect => {
                "anonymous connections are decided by the listener settings, not the ACL"
            }
            Reason::ClientIdIsIdentity => {
                "the client id equals the identity (the user has no `clientid` lines)"
            }
            Reason::ClientIdMismatch => {
                "the client id must equal the identity unless a `clientid` line under the \
                 user allows it"
            }
            Reason::ClientIdNotListed => "no `clientid` line of this user matches the client id",
            Reason::Granted
            | Reason::Denied
            | Reason::DeniedUnsafeSubstitution
            | Reason::NoGrant => "no rule grants it (default deny)",
        };
        write!(f, "{verdict}: {why}")
    }
}

/// A line of an ACL file that does not parse. Configuration errors are fatal, so the line
/// is named and a fix suggested.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}; fix: {fix}")]
pub struct AclError {
    /// 1-based line number.
    pub line: usize,
    pub message: String,
    pub fix: String,
}

/// A parsed ACL file. Cheap to query: rules are sorted per identity and per access when
/// parsed, and read/publish checks do not allocate unless they return a rule.
#[derive(Debug, Clone, Default)]
pub struct AclFile {
    /// Every rule line (`topic`, `pattern`, `clientid`) in file order.
    rules: Vec<RuleRef>,
    /// `topic` lines before the first `user` line.
    anonymous: RuleSet,
    users: HashMap<String, UserBlock>,
    patterns: PatternSet,
}

#[derive(Debug, Clone, Default)]
struct RuleSet {
    read: Vec<TopicRule>,
    write: Vec<TopicRule>,
    deny: Vec<TopicRule>,
}

#[derive(Debug, Clone, Default)]
struct UserBlock {
    topics: RuleSet,
    client_ids: Vec<ClientIdRule>,
}

#[derive(Debug, Clone, Default)]
struct PatternSet {
    read: Vec<PatternRule>,
    write: Vec<PatternRule>,
    deny: Vec<PatternRule>,
}

#[derive(Debug, Clone)]
struct TopicRule {
    filter: TopicFilter,
    /// Index into `AclFile::rules`; rules of one list are in ascending order.
    idx: usize,
}

#[derive(Debug, Clone)]
struct PatternRule {
    template: Template,
    idx: usize,
}

#[derive(Debug, Clone)]
struct ClientIdRule {
    /// The pattern with `%u` substituted and a trailing `*` removed.
    text: String,
    /// A trailing `*`: any client id starting with `text`.
    prefix: bool,
    idx: usize,
}

impl ClientIdRule {
    fn matches(&self, client_id: &str) -> bool {
        if self.prefix {
            client_id.starts_with(&self.text)
        } else {
            client_id == self.text
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

// ---------------------------------------------------------------------------------------
// Pattern templates
// ---------------------------------------------------------------------------------------

/// A `pattern` filter split into levels, with `%u` / `%c` kept as placeholders so that
/// matching a topic substitutes on the fly without allocating.
#[derive(Debug, Clone)]
struct Template {
    levels: Vec<TemplateLevel>,
    uses_identity: bool,
    uses_client_id: bool,
    /// Bytes of literal text (everything but the placeholders).
    literal_len: usize,
    identity_count: usize,
    client_id_count: usize,
    /// The placeholder the filter starts with, if any.
    leading: Option<Placeholder>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplateLevel {
    Plus,
    Hash,
    Parts(Vec<Part>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Sub(Placeholder),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placeholder {
    Identity,
    ClientId,
}

/// Splits `s` at `%u` / `%c` (single pass, so a substituted value is never rescanned).
fn split_placeholders(s: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut lit = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        let sub = match (c, chars.peek()) {
            ('%', Some('u')) => Some(Placeholder::Identity),
            ('%', Some('c')) => Some(Placeholder::ClientId),
            _ => None,
        };
        match sub {
            Some(p) => {
                chars.next();
                if !lit.is_empty() {
                    parts.push(Part::Lit(std::mem::take(&mut lit)));
                }
                parts.push(Part::Sub(p));
            }
            None => lit.push(c),
        }
    }
    if !lit.is_empty() {
        parts.push(Part::Lit(lit));
    }
    parts
}

fn has_placeholder(s: &str) -> bool {
    s.contains("%u") || s.contains("%c")
}

/// The principal's substitution values, checked once per query.
struct Values<'a> {
    identity: &'a str,
    client_id: &'a str,
    identity_ok: bool,
    client_id_ok: bool,
}

impl<'a> Values<'a> {
    fn new(identity: &'a str, client_id: &'a str) -> Self {
        Values {
            identity,
            client_id,
            identity_ok: value_ok(identity),
            client_id_ok: value_ok(client_id),
        }
    }
    fn get(&self, p: Placeholder) -> &'a str {
        match p {
            Placeholder::Identity => self.identity,
            Placeholder::ClientId => self.client_id,
        }
    }
}

/// A value that may be substituted into a filter: one whole, non-wildcard level.
fn value_ok(v: &str) -> bool {
    !v.is_empty() && !v.contains(['+', '#', '/', '\0'])
}

/// How a template substitutes for one principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolution {
    /// A valid filter results.
    Usable,
    /// A valid filter results, but it starts with `$` only because of the value: never a
    /// grant, still a deny.
    LeadingDollar,
    /// No valid filter results: never a grant; a deny denies everything.
    Unsafe,
}

impl Template {
    /// Parses a pattern filter. `Err` carries the message for [`AclError`].
    fn parse(s: &str) -> Result<Template, String> {
        // Validate the shape with every placeholder replaced by a harmless level text.
        let probe: String = split_placeholders(s)
            .iter()
            .map(|p| match p {
                Part::Lit(l) => l.as_str(),
                Part::Sub(_) => "x",
            })
            .collect();
        TopicFilter::new(&probe).map_err(|e| format!("invalid filter `{s}`: {e}"))?;
        let mut t = Template {
            levels: Vec::new(),
            uses_identity: false,
            uses_client_id: false,
            literal_len: 0,
            identity_count: 0,
            client_id_count: 0,
            leading: None,
        };
        for (i, level) in s.split('/').enumerate() {
            let level = match level {
                "+" => TemplateLevel::Plus,
                "#" => TemplateLevel::Hash,
                _ => {
                    let parts = split_placeholders(level);
                    for (j, part) in parts.iter().enumerate() {
                        match part {
                            Part::Lit(_) => {}
                            Part::Sub(p) => {
                                if i == 0 && j == 0 {
                                    t.leading = Some(*p);
                                }
                                match p {
                                    Placeholder::Identity => t.identity_count += 1,
                                    Placeholder::ClientId => t.client_id_count += 1,
                                }
                            }
                        }
                    }
                    TemplateLevel::Parts(parts)
                }
            };
            t.levels.push(level);
        }
        t.literal_len = s.len() - 2 * (t.identity_count + t.client_id_count);
        t.uses_identity = t.identity_count > 0;
        t.uses_client_id = t.client_id_count > 0;
        Ok(t)
    }

    fn resolve(&self, v: &Values<'_>) -> Resolution {
        if (self.uses_identity && !v.identity_ok) || (self.uses_client_id && !v.client_id_ok) {
            return Resolution::Unsafe;
        }
        let len = self
            .identity_count
            .saturating_mul(v.identity.len())
            .saturating_add(self.client_id_count.saturating_mul(v.client_id.len()))
            .saturating_add(self.literal_len);
        if len > MAX_TOPIC_LEN {
            return Resolution::Unsafe;
        }
        match self.leading {
            Some(p) if v.get(p).starts_with('$') => Resolution::LeadingDollar,
            _ => Resolution::Usable,
        }
    }

    /// Whether the substituted filter matches `topic` (call only when resolvable), with
    /// the `$` rule of §4.7.2.
    fn matches(&self, v: &Values<'_>, topic: &TopicName) -> bool {
        if topic.is_dollar()
            && matches!(
                self.levels.first(),
                Some(TemplateLevel::Plus | TemplateLevel::Hash)
            )
        {
            return false;
        }
        let mut name = topic.levels();
        for level in &self.levels {
            match level {
                TemplateLevel::Hash => return true,
                TemplateLevel::Plus => {
                    if name.next().is_none() {
                        return false;
                    }
                }
                TemplateLevel::Parts(parts) => match name.next() {
                    Some(n) if parts_equal(parts, v, n) => {}
                    _ => return false,
                },
            }
        }
        name.next().is_none()
    }

    /// The substituted filter (call only when resolvable).
    fn substitute(&self, v: &Values<'_>) -> Option<TopicFilter> {
        let mut s = String::new();
        for (i, level) in self.levels.iter().enumerate() {
            if i > 0 {
                s.push('/');
            }
            match level {
                TemplateLevel::Plus => s.push('+'),
                TemplateLevel::Hash => s.push('#'),
                TemplateLevel::Parts(parts) => {
                    for part in parts {
                        match part {
                            Part::Lit(l) => s.push_str(l),
                            Part::Sub(p) => s.push_str(v.get(*p)),
                        }
                    }
                }
            }
        }
        TopicFilter::new(s).ok()
    }
}

/// Whether the level `parts` spells (after substitution) equals `level`.
fn parts_equal(parts: &[Part], v: &Values<'_>, mut level: &str) -> bool {
    for part in parts {
        let piece = match part {
            Part::Lit(l) => l.as_str(),
            Part::Sub(p) => v.get(*p),
        };
        match level.strip_prefix(piece) {
            Some(rest) => level = rest,
            None => return false,
        }
    }
    level.is_empty()
}

// ---------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------

/// Splits off the first whitespace-separated word; the rest is trimmed at the start.
fn first_word(s: &str) -> (&str, &str) {
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], s[i..].trim_start()),
        None => (s, ""),
    }
}

fn err(line: usize, message: impl Into<String>, fix: impl Into<String>) -> AclError {
    AclError {
        line,
        message: message.into(),
        fix: fix.into(),
    }
}

const FILTER_FIX: &str =
    "'+' and '#' must fill a whole level, '#' must be the last level, the filter must not be \
     empty (comments are whole lines starting with '#')";

/// `[ACCESS] FILTER` of a `topic` / `pattern` line.
fn access_and_filter(
    directive: &str,
    rest: &str,
    line: usize,
) -> Result<(Access, String), AclError> {
    let (word, after) = first_word(rest);
    if word.is_empty() {
        return Err(err(
            line,
            format!("`{directive}` needs a filter"),
            format!("write `{directive} [read|write|readwrite|deny] FILTER`"),
        ));
    }
    if let Some(access) = Access::parse(word) {
        if after.is_empty() {
            return Err(err(
                line,
                format!("`{directive} {word}` needs a filter"),
                format!(
                    "write `{directive} {word} FILTER` (for a topic literally named \
                     `{word}`, write `{directive} readwrite {word}`)"
                ),
            ));
        }
        return Ok((access, after.to_string()));
    }
    if after.is_empty() {
        // Mosquitto: the access defaults to readwrite.
        return Ok((Access::ReadWrite, word.to_string()));
    }
    Err(err(
        line,
        format!("`{word}` is not an access word (read, write, readwrite, deny)"),
        format!(
            "write `{directive} read|write|readwrite|deny FILTER`; a filter containing \
             spaces needs an explicit access word"
        ),
    ))
}

impl AclFile {
    /// Parses an ACL file. Every malformed line is an error naming the line.
    pub fn parse(text: &str) -> Result<AclFile, AclError> {
        let mut acl = AclFile::default();
        // The `user` block that topic/clientid lines currently apply to (None = anonymous).
        let mut current: Option<String> = None;
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let (directive, rest) = first_word(trimmed);
            match directive {
                "user" => {
                    if rest.is_empty() {
                        return Err(err(
                            line,
                            "`user` without a name",
                            "write `user NAME` (the name is the rest of the line)",
                        ));
                    }
                    acl.users.entry(rest.to_string()).or_default();
                    current = Some(rest.to_string());
                }
                "topic" | "pattern" => {
                    let (access, filter) = access_and_filter(directive, rest, line)?;
                    let idx = acl.rules.len();
                    if directive == "topic" {
                        if has_placeholder(&filter) {
                            return Err(err(
                                line,
                                format!(
                                    "`%u`/`%c` in a `topic` line are not substituted: `{filter}`"
                                ),
                                "use `pattern` for rules with substitutions",
                            ));
                        }
                        let filter = TopicFilter::new(&filter).map_err(|e| {
                            err(line, format!("invalid filter `{filter}`: {e}"), FILTER_FIX)
                        })?;
                        let set = match &current {
                            None => &mut acl.anonymous,
                            Some(name) => &mut acl.users.entry(name.clone()).or_default().topics,
                        };
                        let rule = TopicRule { filter, idx };
                        match access {
                            Access::Read => set.read.push(rule),
                            Access::Write => set.write.push(rule),
                            Access::ReadWrite => {
                                set.read.push(rule.clone());
                                set.write.push(rule);
                            }
                            Access::Deny => set.deny.push(rule),
                        }
                    } else {
                        let template =
                            Template::parse(&filter).map_err(|m| err(line, m, FILTER_FIX))?;
                        let set = &mut acl.patterns;
                        let rule = PatternRule { template, idx };
                        match access {
                            Access::Read => set.read.push(rule),
                            Access::Write => set.write.push(rule),
                            Access::ReadWrite => {
                                set.read.push(rule.clone());
                                set.write.push(rule);
                            }
                            Access::Deny => set.deny.push(rule),
                        }
                    }
                    acl.rules.push(RuleRef {
                        line,
                        text: trimmed.to_string(),
                    });
                }
                "clientid" => {
                    let Some(name) = &current else {
                        return Err(err(
                            line,
                            "`clientid` outside a `user` block",
                            "put `clientid` lines after the `user NAME` line they belong to",
                        ));
                    };
                    if rest.is_empty() {
                        return Err(err(
                            line,
                            "`clientid` needs a client id pattern",
                            "write `clientid ID`, `clientid PREFIX*`, `clientid %u-*` or \
                             `clientid *`",
                        ));
                    }
                    let (body, prefix) = match rest.strip_suffix('*') {
                        Some(body) => (body, true),
                        None => (rest, false),
                    };
                    if body.contains('*') {
                        return Err(err(
                            line,
                            format!("`*` in `clientid {rest}` is not at the end"),
                            "`*` is only allowed as the last character (any suffix)",
                        ));
                    }
                    let mut text = String::new();
                    for part in split_placeholders(body) {
                        match part {
                            Part::Lit(l) => text.push_str(&l),
                            Part::Sub(Placeholder::Identity) => text.push_str(name),
                            Part::Sub(Placeholder::ClientId) => {
                                return Err(err(
                                    line,
                                    format!("`%c` has no meaning in `clientid {rest}`"),
                                    "use a literal client id, `%u` or a trailing `*`",
                                ));
                            }
                        }
                    }
                    let idx = acl.rules.len();
                    acl.users
                        .entry(name.clone())
                        .or_default()
                        .client_ids
                        .push(ClientIdRule { text, prefix, idx });
                    acl.rules.push(RuleRef {
                        line,
                        text: trimmed.to_string(),
                    });
                }
                other => {
                    return Err(err(
                        line,
                        format!("unknown directive `{other}`"),
                        "use `topic`, `pattern`, `user` or `clientid` (lowercase), or start \
                         the line with `#` to make it a comment",
                    ));
                }
            }
        }
        Ok(acl)
    }

    /// Number of rules: `topic`, `pattern` and `clientid` lines.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Whether `identity` may connect with `client_id`. Anonymous connections (`None`) are
    /// the broker's decision and always pass here.
    pub fn check_connect(&self, identity: Option<&str>, client_id: &str) -> Decision {
        let Some(identity) = identity else {
            return self.builtin(true, Reason::AnonymousConnect);
        };
        let rules = self
            .users
            .get(identity)
            .map(|u| u.client_ids.as_slice())
            .unwrap_or_default();
        if rules.is_empty() {
            return if client_id == identity {
                self.builtin(true, Reason::ClientIdIsIdentity)
            } else {
                self.builtin(false, Reason::ClientIdMismatch)
            };
        }
        match rules.iter().find(|r| r.matches(client_id)) {
            Some(r) => self.by_rule(true, Reason::Granted, r.idx),
            None => self.builtin(false, Reason::ClientIdNotListed),
        }
    }

    /// Whether `who` may publish to `topic`: a write grant matches, no deny matches, and the
    /// topic does not start with `$`.
    pub fn check_publish(&self, who: &Principal<'_>, topic: &TopicName) -> Decision {
        if topic.is_dollar() {
            return self.builtin(false, Reason::DollarTopic);
        }
        self.decide(self.eval_topic(who, topic, Op::Write))
    }

    /// Whether a message on `topic` may be delivered to `who` (live, retained or queued).
    pub fn check_read(&self, who: &Principal<'_>, topic: &TopicName) -> Decision {
        self.decide(self.eval_topic(who, topic, Op::Read))
    }

    /// [`check_read`](Self::check_read) as a plain yes/no: never allocates, `%u`/`%c`
    /// patterns included. For the delivery hot path.
    pub fn allows_read(&self, who: &Principal<'_>, topic: &TopicName) -> bool {
        matches!(self.eval_topic(who, topic, Op::Read), Eval::Allowed(_))
    }

    /// [`check_publish`](Self::check_publish) as a plain yes/no, without allocating.
    pub fn allows_publish(&self, who: &Principal<'_>, topic: &TopicName) -> bool {
        !topic.is_dollar() && matches!(self.eval_topic(who, topic, Op::Write), Eval::Allowed(_))
    }

    /// Whether `who` may subscribe to `filter`: one read grant contains it (every topic it
    /// matches is granted) and no deny intersects it.
    pub fn check_subscribe(&self, who: &Principal<'_>, filter: &TopicFilter) -> Decision {
        let (set, vals) = self.applicable(who);
        // Denies, first in file order.
        let mut deny: Option<Eval> = None;
        let mut consider = |e: Eval| {
            if deny.is_none_or(|d| e.idx() < d.idx()) {
                deny = Some(e);
            }
        };
        if let Some(r) = set
            .into_iter()
            .flat_map(|s| &s.deny)
            .find(|r| filters_intersect(&r.filter, filter))
        {
            consider(Eval::Denied(r.idx));
        }
        if let Some(vals) = &vals {
            for p in &self.patterns.deny {
                let hit = match p.template.resolve(vals) {
                    Resolution::Unsafe => Some(Eval::DeniedUnsafe(p.idx)),
                    Resolution::Usable | Resolution::LeadingDollar => {
                        match p.template.substitute(vals) {
                            Some(f) if filters_intersect(&f, filter) => Some(Eval::Denied(p.idx)),
                            Some(_) => None,
                            None => Some(Eval::DeniedUnsafe(p.idx)),
                        }
                    }
                };
                if let Some(e) = hit {
                    consider(e);
                    break;
                }
            }
        }
        if let Some(d) = deny {
            return self.decide(d);
        }
        let mut grant: Option<usize> = set
            .into_iter()
            .flat_map(|s| &s.read)
            .find(|r| filter_contains(&r.filter, filter))
            .map(|r| r.idx);
        if let Some(vals) = &vals {
            for p in &self.patterns.read {
                if grant.is_some_and(|g| g < p.idx) {
                    break;
                }
                if p.template.resolve(vals) != Resolution::Usable {
                    continue;
                }
                if p.template
                    .substitute(vals)
                    .is_some_and(|f| filter_contains(&f, filter))
                {
                    grant = Some(p.idx);
                    break;
                }
            }
        }
        self.decide(grant.map_or(Eval::NoGrant, Eval::Allowed))
    }

    /// Whether `who` may open a tunnel to `device` for `service`: write access on
    /// `$tunnel/DEVICE/open/SERVICE` by the normal rules (deny wins, default deny).
    pub fn check_tunnel(&self, who: &Principal<'_>, device: &str, service: &str) -> Decision {
        if !value_ok(device) || !value_ok(service) {
            return self.builtin(false, Reason::InvalidTunnelName);
        }
        match TopicName::new(format!("$tunnel/{device}/open/{service}")) {
            Ok(topic) => self.decide(self.eval_topic(who, &topic, Op::Write)),
            Err(_) => self.builtin(false, Reason::InvalidTunnelName),
        }
    }

    /// A one-line explanation of `d`, e.g. "allowed by line 7: `pattern readwrite
    /// devices/%u/data/#`" or "denied: no rule grants it (default deny)".
    pub fn explain(&self, d: &Decision) -> String {
        d.to_string()
    }

    // -- evaluation ------------------------------------------------------------------

    /// The topic rules that apply to `who` and, for an identity, its substitution values
    /// (patterns apply to identities only).
    fn applicable<'s, 'w>(
        &'s self,
        who: &Principal<'w>,
    ) -> (Option<&'s RuleSet>, Option<Values<'w>>) {
        match who.identity {
            None => (Some(&self.anonymous), None),
            Some(id) => (
                self.users.get(id).map(|u| &u.topics),
                Some(Values::new(id, who.client_id)),
            ),
        }
    }

    /// Read or write access to a concrete topic: deny first (any, earliest line reported),
    /// then the earliest grant. Allocation-free.
    fn eval_topic(&self, who: &Principal<'_>, topic: &TopicName, op: Op) -> Eval {
        let (set, vals) = self.applicable(who);
        let mut deny: Option<Eval> = set
            .and_then(|s| s.deny.iter().find(|r| r.filter.matches(topic)))
            .map(|r| Eval::Denied(r.idx));
        if let Some(vals) = &vals {
            for p in &self.patterns.deny {
                if deny.is_some_and(|d| d.idx() < p.idx) {
                    break;
                }
                let hit = match p.template.resolve(vals) {
                    Resolution::Unsafe => Some(Eval::DeniedUnsafe(p.idx)),
                    Resolution::Usable | Resolution::LeadingDollar => p
                        .template
                        .matches(vals, topic)
                        .then_some(Eval::Denied(p.idx)),
                };
                if hit.is_some() {
                    deny = hit;
                    break;
                }
            }
        }
        if let Some(d) = deny {
            return d;
        }
        let (topic_grants, pattern_grants) = match op {
            Op::Read => (set.map(|s| &s.read), &self.patterns.read),
            Op::Write => (set.map(|s| &s.write), &self.patterns.write),
        };
        let mut grant: Option<usize> = topic_grants
            .and_then(|g| g.iter().find(|r| r.filter.matches(topic)))
            .map(|r| r.idx);
        if let Some(vals) = &vals {
            for p in pattern_grants {
                if grant.is_some_and(|g| g < p.idx) {
                    break;
                }
                if p.template.resolve(vals) == Resolution::Usable && p.template.matches(vals, topic)
                {
                    grant = Some(p.idx);
                    break;
                }
            }
        }
        grant.map_or(Eval::NoGrant, Eval::Allowed)
    }

    fn decide(&self, e: Eval) -> Decision {
        match e {
            Eval::Allowed(i) => self.by_rule(true, Reason::Granted, i),
            Eval::Denied(i) => self.by_rule(false, Reason::Denied, i),
            Eval::DeniedUnsafe(i) => self.by_rule(false, Reason::DeniedUnsafeSubstitution, i),
            Eval::NoGrant => self.builtin(false, Reason::NoGrant),
        }
    }

    fn by_rule(&self, allowed: bool, reason: Reason, idx: usize) -> Decision {
        Decision {
            allowed,
            rule: Some(self.rules[idx].clone()),
            reason,
        }
    }

    fn builtin(&self, allowed: bool, reason: Reason) -> Decision {
        Decision {
            allowed,
            rule: None,
            reason,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Eval {
    Allowed(usize),
    Denied(usize),
    DeniedUnsafe(usize),
    NoGrant,
}

impl Eval {
    fn idx(self) -> usize {
        match self {
            Eval::Allowed(i) | Eval::Denied(i) | Eval::DeniedUnsafe(i) => i,
            Eval::NoGrant => usize::MAX,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Filter algebra
// ---------------------------------------------------------------------------------------

/// Whether a filter's first level is `+` or `#` (it then never matches `$` topics).
fn starts_with_wildcard(f: &TopicFilter) -> bool {
    f.as_str().starts_with(['+', '#'])
}

/// Whether every topic `inner` matches is also matched by `outer` (§4.7, including the `$`
/// rule: a filter starting with `$` is contained only in filters whose first level is the
/// same literal).
///
/// Containment is judged over every possible topic, so `+` is contained only in `+` or `#`
/// (never in a set of literals). Topics have at least one character, so the topic made of
/// one empty level does not exist: `#` is contained in `+/#`, and `/#` in `+/+/#`.
pub fn filter_contains(outer: &TopicFilter, inner: &TopicFilter) -> bool {
    // inner's topics all start with `$` iff its first level is a literal starting with `$`;
    // a first-level wildcard in outer excludes them all.
    if inner.as_str().starts_with('$') && starts_with_wildcard(outer) {
        return false;
    }
    let mut o = outer.levels();
    let mut i = inner.levels();
    let mut depth = 0usize;
    loop {
        match (o.next(), i.next()) {
            // outer takes this level's parent and anything below it; inner's topics all
            // have the levels matched so far.
            (Some("#"), _) => return true,
            // inner takes every topic with the prefix matched so far, from `depth` levels on
            // (its parent level) to any length. outer needs `#` here, unless the topic of
            // `depth` levels cannot exist (no level at all, or one empty level): then `+/#`
            // from here covers inner's shortest real topics and all longer ones.
            (o_level, Some("#")) => {
                let shortest_exists =
                    depth >= 2 || (depth == 1 && !inner.as_str().starts_with('/'));
                return !shortest_exists && o_level == Some("+") && o.next() == Some("#");
            }
            (None, None) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
        depth += 1;
    }
}

/// Whether some topic matches both `a` and `b` (with the `$` rule of §4.7.2, and no topic
/// of one empty level: `/#` and `+` share nothing).
pub fn filters_intersect(a: &TopicFilter, b: &TopicFilter) -> bool {
    if (a.as_str().starts_with('$') && starts_with_wildcard(b))
        || (b.as_str().starts_with('$') && starts_with_wildcard(a))
    {
        return false;
    }
    let mut x = a.levels();
    let mut y = b.levels();
    let mut depth = 0usize;
    loop {
        match (x.next(), y.next()) {
            // One filter takes anything from here on. If the other ends here, the common
            // topic is the other's: it exists unless it is the single empty level, which
            // the `#` side forces only as `/#` (against `+`).
            (Some("#"), None) => return !(depth == 1 && a.as_str().starts_with('/')),
            (None, Some("#")) => return !(depth == 1 && b.as_str().starts_with('/')),
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) if p == q => {}
            _ => return false,
        }
        depth += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(text: &str) -> AclFile {
        AclFile::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }
    fn name(s: &str) -> TopicName {
        TopicName::new(s).unwrap()
    }
    fn filter(s: &str) -> TopicFilter {
        TopicFilter::new(s).unwrap()
    }
    fn user<'a>(id: &'a str) -> Principal<'a> {
        Principal::user(id, id)
    }
    const ANON: Principal<'static> = Principal {
        identity: None,
        client_id: "anon-1",
    };
    fn read(a: &AclFile, who: Principal<'_>, t: &str) -> bool {
        let d = a.check_read(&who, &name(t));
        assert_eq!(d.allowed, a.allows_read(&who, &name(t)), "{t}");
        d.allowed
    }
    fn write(a: &AclFile, who: Principal<'_>, t: &str) -> bool {
        let d = a.check_publish(&who, &name(t));
        assert_eq!(d.allowed, a.allows_publish(&who, &name(t)), "{t}");
        d.allowed
    }
    fn sub(a: &AclFile, who: Principal<'_>, f: &str) -> bool {
        a.check_subscribe(&who, &filter(f)).allowed
    }
    fn line_of(d: &Decision) -> Option<usize> {
        d.rule.as_ref().map(|r| r.line)
    }
    fn contains(o: &str, i: &str) -> bool {
        filter_contains(&filter(o), &filter(i))
    }
    fn intersect(a: &str, b: &str) -> bool {
        let r = filters_intersect(&filter(a), &filter(b));
        assert_eq!(r, filters_intersect(&filter(b), &filter(a)), "{a} {b}");
        r
    }

    // -- parsing -------------------------------------------------------------------------

    #[test]
    fn comments_blank_lines_and_whitespace_are_ignored() {
        let a = acl("# a comment\n\n   \t\n  # indented comment\n\ttopic read a/b  \r\nuser alice\n  topic   write   c/d\n");
        assert_eq!(a.rule_count(), 2);
        assert!(read(&a, ANON, "a/b"));
        assert!(write(&a, user("alice"), "c/d"));
        let d = a.check_publish(&user("alice"), &name("c/d"));
        assert_eq!(
            d.rule,
            Some(RuleRef {
                line: 7,
                text: "topic   write   c/d".into()
            })
        );
    }

    #[test]
    fn access_defaults_to_readwrite() {
        let a = acl("user alice\ntopic x/#\n");
        assert!(read(&a, user("alice"), "x/1"));
        assert!(write(&a, user("alice"), "x/1"));
        assert!(sub(&a, user("alice"), "x/+"));
    }

    #[test]
    fn access_words_are_respected() {
        let a = acl("user u\ntopic read r\ntopic write w\ntopic readwrite rw\n");
        let u = user("u");
        assert!(read(&a, u, "r") && !write(&a, u, "r"));
        assert!(!read(&a, u, "w") && write(&a, u, "w"));
        assert!(read(&a, u, "rw") && write(&a, u, "rw"));
        assert!(sub(&a, u, "r") && !sub(&a, u, "w") && sub(&a, u, "rw"));
    }

    #[test]
    fn filters_may_contain_spaces_after_an_access_word() {
        let a = acl("user u\ntopic read sport/tennis player1\n");
        assert!(read(&a, user("u"), "sport/tennis player1"));
    }

    #[test]
    fn user_names_are_the_rest_of_the_line_and_blocks_add_up() {
        let a = acl(
            "user Jane Doe\ntopic read a\nuser bob\ntopic read b\nuser Jane Doe\ntopic read c\n",
        );
        let jane = Principal::user("Jane Doe", "Jane Doe");
        assert!(read(&a, jane, "a") && read(&a, jane, "c") && !read(&a, jane, "b"));
        assert!(read(&a, user("bob"), "b") && !read(&a, user("bob"), "a"));
        assert!(!read(&a, user("Jane"), "a"));
    }

    fn parse_err(text: &str) -> AclError {
        match AclFile::parse(text) {
            Ok(_) => panic!("{text:?} parsed"),
            Err(e) => e,
        }
    }

    #[test]
    fn parse_errors_name_the_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("topic read a\nfoo bar\n", 2, "unknown directive `foo`"),
            ("Topic read a\n", 1, "unknown directive `Topic`"),
            ("\n\ntopic\n", 3, "`topic` needs a filter"),
            ("topic read\n", 1, "`topic read` needs a filter"),
            ("pattern deny   \n", 1, "`pattern deny` needs a filter"),
            ("topic reed a/b\n", 1, "`reed` is not an access word"),
            ("pattern rw a/b\n", 1, "`rw` is not an access word"),
            ("topic read a/#/b\n", 1, "invalid filter `a/#/b`"),
            ("topic read a+\n", 1, "invalid filter `a+`"),
            ("topic read a/b # comment\n", 1, "invalid filter"),
            ("topic read a\0b\n", 1, "invalid filter"),
            (
                "pattern read devices/%u#\n",
                1,
                "invalid filter `devices/%u#`",
            ),
            ("pattern read +%u/x\n", 1, "invalid filter"),
            (
                "user u\ntopic read devices/%u/x\n",
                2,
                "are not substituted",
            ),
            ("clientid abc\n", 1, "`clientid` outside a `user` block"),
            ("user\n", 1, "`user` without a name"),
            ("user   \t \n", 1, "`user` without a name"),
            (
                "user u\nclientid\n",
                2,
                "`clientid` needs a client id pattern",
            ),
            ("user u\nclientid a*b\n", 2, "is not at the end"),
            ("user u\nclientid %c\n", 2, "`%c` has no meaning"),
        ];
        for (text, line, msg) in cases {
            let e = parse_err(text);
            assert_eq!(e.line, *line, "{text:?}: {e}");
            assert!(e.message.contains(msg), "{text:?}: {e}");
            let shown = e.to_string();
            assert!(
                shown.starts_with(&format!("line {line}: ")) && shown.contains("; fix: "),
                "{shown}"
            );
        }
    }

    #[test]
    fn a7_empty_acl_denies_everything() {
        for text in ["", "\n\n", "# only comments\n", "user alice\n"] {
            let a = acl(text);
            assert_eq!(a.rule_count(), 0);
            for who in [ANON, user("alice")] {
                assert!(!read(&a, who, "a"));
                assert!(!write(&a, who, "a"));
                assert!(!read(&a, who, "$SYS/broker"));
                assert!(!sub(&a, who, "#"));
                assert!(!sub(&a, who, "a"));
                let d = a.check_tunnel(&who, "gw-17", "ssh");
                assert_eq!((d.allowed, d.reason), (false, Reason::NoGrant));
                assert_eq!(
                    a.explain(&a.check_read(&who, &name("a"))),
                    "denied: no rule grants it (default deny)"
                );
            }
        }
    }

    // -- scopes ----------------------------------------------------------------------------

    #[test]
    fn topics_before_any_user_apply_to_anonymous_clients_only() {
        let a =
            acl("topic read public/#\nuser alice\ntopic read alice/#\npattern read shared/%u\n");
        assert!(read(&a, ANON, "public/x"));
        assert!(!read(&a, ANON, "alice/x"));
        assert!(!read(&a, ANON, "shared/%u"));
        assert!(!read(&a, user("alice"), "public/x"));
        assert!(read(&a, user("alice"), "alice/x"));
        assert!(read(&a, user("alice"), "shared/alice"));
        assert!(!read(&a, user("bob"), "public/x"));
        assert!(!read(&a, user("bob"), "alice/x"));
        assert!(read(&a, user("bob"), "shared/bob"));
    }

    #[test]
    fn patterns_apply_to_every_identity_wherever_they_appear() {
        // Mosquitto: a pattern inside a user block is still global.
        let a = acl("user alice\npattern read x/%u\npattern read %c/in\npattern read fixed\n");
        for id in ["alice", "bob"] {
            let who = Principal::user(id, "c1");
            assert!(read(&a, who, &format!("x/{id}")));
            assert!(read(&a, who, "c1/in"));
            assert!(read(&a, who, "fixed"));
            assert!(!read(&a, who, "x/carol"));
            assert!(!read(&a, who, "c2/in"));
        }
        assert!(!read(&a, ANON, "fixed"));
        assert!(!read(&a, ANON, "anon-1/in"));
    }

    #[test]
    fn placeholders_inside_levels() {
        let a = acl("pattern readwrite site-%u/%c-%u/#\n");
        let who = Principal::user("gw", "c7");
        assert!(write(&a, who, "site-gw/c7-gw"));
        assert!(write(&a, who, "site-gw/c7-gw/deep/er"));
        assert!(!write(&a, who, "site-gw/c7-gwx"));
        assert!(!write(&a, who, "site-g/c7-gw"));
        assert!(sub(&a, who, "site-gw/c7-gw/+"));
        assert!(!sub(&a, who, "site-gw/+/x"));
    }

    // -- A1 --------------------------------------------------------------------------------

    #[test]
    fn a1_wildcard_or_slash_identities_never_match_a_pattern() {
        let a = acl("pattern readwrite devices/%u/#\n");
        assert!(read(&a, user("gw-17"), "devices/gw-17/data"));
        assert!(sub(&a, user("gw-17"), "devices/gw-17/#"));
        for id in ["#", "+", "a/b", "", "a+", "x#", "a\0b"] {
            let who = Principal::user(id, "cid");
            for t in [
                "devices/x",
                "devices/x/y",
                "devices/a/b",
                "devices/a/b/c",
                "devices//x",
            ] {
                assert!(!read(&a, who, t), "{id:?} reads {t}");
                assert!(!write(&a, who, t), "{id:?} writes {t}");
            }
            for f in [
                "devices/#",
                "devices/+/x",
                "devices/a/b/#",
                "#",
                "devices//#",
            ] {
                assert!(!sub(&a, who, f), "{id:?} subscribes {f}");
            }
        }
    }

    #[test]
    fn a1_client_id_substitution_is_checked_the_same_way() {
        let a = acl("pattern readwrite clients/%c/#\nuser u\nclientid *\n");
        assert!(read(&a, Principal::user("u", "c1"), "clients/c1/x"));
        for cid in ["#", "+", "c1/x", ""] {
            let who = Principal::user("u", cid);
            assert!(!read(&a, who, "clients/c1/x"), "{cid:?}");
            assert!(!sub(&a, who, "clients/#"), "{cid:?}");
        }
    }

    #[test]
    fn a1_dollar_value_at_the_start_of_a_pattern_grants_nothing() {
        let a = acl("pattern read %u/#\npattern write %c/x/open/ssh\nuser u\nclientid *\n");
        let who = Principal::user("$SYS", "$SYS");
        assert!(!read(&a, who, "$SYS/broker/clients"));
        assert!(!sub(&a, who, "$SYS/#"));
        let who = Principal::user("u", "$tunnel");
        assert!(!a.check_tunnel(&who, "x", "ssh").allowed);
        // Elsewhere in the filter a '$' is an ordinary character.
        let a = acl("pattern read home/%u\n");
        assert!(read(&a, user("$me"), "home/$me"));
    }

    #[test]
    fn substitution_is_single_pass() {
        let a = acl("pattern read a/%u/%c\n");
        let who = Principal::user("%c", "x");
        assert!(read(&a, who, "a/%c/x"));
        assert!(!read(&a, who, "a/x/x"));
    }

    #[test]
    fn overlong_substitution_never_matches() {
        let a = acl("pattern read %u/#\n");
        let long = "x".repeat(MAX_TOPIC_LEN - 1);
        assert!(!read(&a, user(&long), &long));
        let ok = "x".repeat(MAX_TOPIC_LEN - 2);
        assert!(read(&a, user(&ok), &ok));
    }

    // -- A2 and `$` topics ------------------------------------------------------------------

    #[test]
    fn a2_subscribing_hash_needs_an_explicit_hash_grant() {
        let a = acl(
            "user app\ntopic read devices/#\ntopic read plant/+/temp\nuser admin\ntopic read #\n",
        );
        let app = user("app");
        assert!(!sub(&a, app, "#"));
        assert!(!sub(&a, app, "+/#"));
        assert!(!sub(&a, app, "+/+/temp"));
        assert!(sub(&a, app, "devices/#"));
        assert!(sub(&a, app, "devices/+/data/#"));
        assert!(sub(&a, app, "plant/+/temp"));
        assert!(sub(&a, app, "plant/line1/temp"));
        assert!(!sub(&a, app, "plant/#"));
        assert!(!sub(&a, app, "plant/+/+"));
        let admin = user("admin");
        assert!(sub(&a, admin, "#"));
        assert!(sub(&a, admin, "+/#"));
        assert!(sub(&a, admin, "anything/at/all"));
    }

    #[test]
    fn a2_hash_grant_never_yields_sys() {
        let a = acl("user admin\ntopic readwrite #\nuser ops\ntopic read #\ntopic read $SYS/#\n");
        let admin = user("admin");
        assert!(!read(&a, admin, "$SYS/broker/clients"));
        assert!(!read(&a, admin, "$tunnel/gw/notify"));
        assert!(!sub(&a, admin, "$SYS/#"));
        assert!(!sub(&a, admin, "$SYS"));
        assert!(!a.check_tunnel(&admin, "gw", "ssh").allowed);
        let ops = user("ops");
        assert!(read(&a, ops, "$SYS/broker/clients"));
        assert!(sub(&a, ops, "$SYS/#"));
        assert!(sub(&a, ops, "$SYS/broker/+"));
        assert!(!sub(&a, ops, "$OTHER/#"));
    }

    #[test]
    fn nobody_publishes_to_dollar_topics() {
        let a = acl("user root\ntopic write $SYS/#\ntopic write $tunnel/#\ntopic write $x\n");
        let root = user("root");
        for t in [
            "$SYS/broker",
            "$tunnel/gw/open/ssh",
            "$tunnel/gw/notify",
            "$x",
        ] {
            let d = a.check_publish(&root, &name(t));
            assert_eq!(
                (d.allowed, d.reason, d.rule.clone()),
                (false, Reason::DollarTopic, None)
            );
            assert_eq!(a.explain(&d), "denied: clients never publish to `$` topics");
        }
        // The same grant is what opens tunnels.
        assert!(a.check_tunnel(&root, "gw", "ssh").allowed);
    }

    // -- deny ------------------------------------------------------------------------------

    #[test]
    fn deny_wins_regardless_of_order() {
        for text in [
            "user u\ntopic deny plant/secret/#\ntopic readwrite plant/#\n",
            "user u\ntopic readwrite plant/#\ntopic deny plant/secret/#\n",
            "user u\ntopic readwrite plant/#\npattern deny plant/secret/#\n",
            "pattern deny plant/secret/#\nuser u\ntopic readwrite plant/#\n",
        ] {
            let a = acl(text);
            let u = user("u");
            assert!(read(&a, u, "plant/line1"), "{text}");
            assert!(write(&a, u, "plant/line1"), "{text}");
            assert!(!read(&a, u, "plant/secret"), "{text}");
            assert!(!write(&a, u, "plant/secret/x"), "{text}");
            assert!(!sub(&a, u, "plant/#"), "{text}");
            assert!(!sub(&a, u, "plant/+"), "{text}");
            assert!(!sub(&a, u, "+/secret/x"), "{text}");
            assert!(sub(&a, u, "plant/line1/#"), "{text}");
            let d = a.check_read(&u, &name("plant/secret/a"));
            assert_eq!(d.reason, Reason::Denied);
            assert!(d.rule.unwrap().text.contains("deny plant/secret/#"));
        }
    }

    #[test]
    fn deny_applies_to_its_scope_only() {
        let a = acl("topic deny x\ntopic read #\nuser u\ntopic read #\n");
        assert!(!read(&a, ANON, "x"));
        assert!(read(&a, ANON, "y"));
        assert!(read(&a, user("u"), "x"));
    }

    #[test]
    fn deny_pattern_substitutes_and_fails_closed() {
        let a = acl("user u\ntopic readwrite #\nuser a/b\ntopic readwrite #\nuser $SYS\ntopic readwrite #\npattern deny home/%u/private\n");
        assert!(read(&a, user("u"), "home/v/private"));
        assert!(!read(&a, user("u"), "home/u/private"));
        assert!(!sub(&a, user("u"), "home/+/private"));
        assert!(sub(&a, user("u"), "home/v/#"));
        // An identity that cannot be substituted is denied everything.
        let d = a.check_read(&user("a/b"), &name("unrelated"));
        assert_eq!(d.reason, Reason::DeniedUnsafeSubstitution);
        assert_eq!(line_of(&d), Some(7));
        assert!(a
            .explain(&d)
            .starts_with("denied by line 7: `pattern deny home/%u/private` ("));
        assert!(!sub(&a, user("a/b"), "unrelated"));
        assert!(!write(&a, user("a/b"), "unrelated"));
        // A leading '$' value still denies (and grants nothing).
        let a = acl("user $SYS\ntopic read $SYS/#\npattern deny %u/secret\n");
        assert!(read(&a, user("$SYS"), "$SYS/public"));
        assert!(!read(&a, user("$SYS"), "$SYS/secret"));
    }

    // -- decisions and explanations ----------------------------------------------------------

    #[test]
    fn the_first_matching_grant_is_reported() {
        let a = acl("user u\ntopic read a/#\npattern read a/%u\ntopic read a/u\n");
        let d = a.check_read(&user("u"), &name("a/u"));
        assert_eq!(line_of(&d), Some(2));
        let a = acl("pattern read a/%u\nuser u\ntopic read a/#\n");
        let d = a.check_read(&user("u"), &name("a/u"));
        assert_eq!(line_of(&d), Some(1));
        let d = a.check_subscribe(&user("u"), &filter("a/u"));
        assert_eq!(line_of(&d), Some(1));
    }

    #[test]
    fn explain_strings() {
        let a =
            acl("user u\ntopic deny plant/secret/#\n\n\n\n\npattern readwrite devices/%u/data/#\n");
        let d = a.check_publish(&user("u"), &name("devices/u/data/x"));
        assert!(d.allowed);
        assert_eq!(
            a.explain(&d),
            "allowed by line 7: `pattern readwrite devices/%u/data/#`"
        );
        let d = a.check_read(&user("u"), &name("plant/secret/a"));
        assert_eq!(
            a.explain(&d),
            "denied by line 2: `topic deny plant/secret/#`"
        );
        let d = a.check_read(&user("u"), &name("other"));
        assert_eq!(a.explain(&d), "denied: no rule grants it (default deny)");
        assert_eq!(d.to_string(), a.explain(&d));
    }

    // -- connect ---------------------------------------------------------------------------

    #[test]
    fn client_id_must_equal_identity_by_default() {
        let a = acl("user gw-17\ntopic read x\n");
        let d = a.check_connect(Some("gw-17"), "gw-17");
        assert_eq!((d.allowed, d.reason), (true, Reason::ClientIdIsIdentity));
        let d = a.check_connect(Some("gw-17"), "gw-18");
        assert_eq!((d.allowed, d.reason), (false, Reason::ClientIdMismatch));
        assert!(a
            .explain(&d)
            .starts_with("denied: the client id must equal"));
        // Also for identities the file does not mention.
        assert!(a.check_connect(Some("other"), "other").allowed);
        assert!(!a.check_connect(Some("other"), "").allowed);
        let d = a.check_connect(None, "whatever");
        assert_eq!((d.allowed, d.reason), (true, Reason::AnonymousConnect));
    }

    #[test]
    fn clientid_lines() {
        let a = acl("user app\nclientid app-*\nclientid %u-test\nclientid dashboard\nuser any\nclientid *\nuser gw\ntopic read x\n");
        for cid in ["app-1", "app-", "app-test", "dashboard"] {
            let d = a.check_connect(Some("app"), cid);
            assert!(d.allowed, "{cid}");
            assert_eq!(d.reason, Reason::Granted);
        }
        assert_eq!(
            a.explain(&a.check_connect(Some("app"), "dashboard")),
            "allowed by line 4: `clientid dashboard`"
        );
        assert_eq!(line_of(&a.check_connect(Some("app"), "app-x")), Some(2));
        for cid in ["app", "ap", "dashboard2", "xapp-1", ""] {
            let d = a.check_connect(Some("app"), cid);
            assert_eq!(
                (d.allowed, d.reason),
                (false, Reason::ClientIdNotListed),
                "{cid}"
            );
        }
        for cid in ["", "x", "any", "#"] {
            assert!(a.check_connect(Some("any"), cid).allowed);
        }
        assert!(a.check_connect(Some("gw"), "gw").allowed);
        assert!(!a.check_connect(Some("gw"), "app-1").allowed);
        assert_eq!(a.rule_count(), 5);
    }

    // -- tunnels ---------------------------------------------------------------------------

    #[test]
    fn tunnel_grants() {
        let a = acl("user op1\ntopic write $tunnel/gw-17/open/ssh\nuser op2\ntopic write $tunnel/+/open/ssh\nuser op3\ntopic readwrite $tunnel/#\ntopic deny $tunnel/gw-9/#\nuser op4\ntopic read $tunnel/#\n");
        let t = |who: &str, d: &str, s: &str| a.check_tunnel(&user(who), d, s).allowed;
        assert!(t("op1", "gw-17", "ssh"));
        assert!(!t("op1", "gw-17", "http"));
        assert!(!t("op1", "gw-18", "ssh"));
        assert!(t("op2", "gw-17", "ssh") && t("op2", "gw-18", "ssh"));
        assert!(!t("op2", "gw-17", "http"));
        assert!(t("op3", "gw-1", "http"));
        assert!(!t("op3", "gw-9", "ssh"));
        assert!(!t("op4", "gw-1", "ssh"), "read is not a tunnel grant");
        assert!(t("op1", "gw-17", "ssh"));
        let d = a.check_tunnel(&user("op1"), "gw-17", "ssh");
        assert_eq!(
            a.explain(&d),
            "allowed by line 2: `topic write $tunnel/gw-17/open/ssh`"
        );
        for (d, s) in [
            ("#", "ssh"),
            ("+", "ssh"),
            ("a/b", "ssh"),
            ("", "ssh"),
            ("gw", ""),
            ("gw", "s/h"),
            ("gw", "#"),
            ("gw", "+"),
        ] {
            let dec = a.check_tunnel(&user("op3"), d, s);
            assert_eq!(
                (dec.allowed, dec.reason),
                (false, Reason::InvalidTunnelName),
                "{d:?} {s:?}"
            );
        }
        // A pattern grants every identity (and `%u` can name the operator's own devices).
        let a = acl("pattern write $tunnel/+/open/ssh\npattern write $tunnel/%u-gw/open/#\n");
        assert!(a.check_tunnel(&user("x"), "gw-1", "ssh").allowed);
        assert!(!a.check_tunnel(&user("x"), "gw-1", "http").allowed);
        assert!(a.check_tunnel(&user("x"), "x-gw", "http").allowed);
        assert!(!a.check_tunnel(&user("y"), "x-gw", "http").allowed);
        assert!(!a.check_tunnel(&ANON, "gw-1", "ssh").allowed);
        // Anonymous tunnels follow the same rules.
        let a = acl("topic write $tunnel/gw/open/ssh\n");
        assert!(a.check_tunnel(&ANON, "gw", "ssh").allowed);
        assert!(!a.check_tunnel(&user("x"), "gw", "ssh").allowed);
    }

    // -- defaults --------------------------------------------------------------------------

    #[test]
    fn default_device_rules() {
        let a = acl(DEFAULT_DEVICE_RULES);
        assert_eq!(a.rule_count(), 7);
        let gw = user("gw-17");
        for t in [
            "devices/gw-17/data/line1/temp",
            "devices/gw-17/status",
            "devices/gw-17/health",
            "devices/gw-17/cmd-result/reboot",
            "devices/gw-17/audit",
        ] {
            assert!(write(&a, gw, t), "{t}");
            assert!(!write(&a, user("gw-18"), t), "{t}");
        }
        assert!(!write(&a, gw, "devices/gw-17/cmd/reboot"));
        assert!(sub(&a, gw, "devices/gw-17/cmd/#"));
        assert!(sub(&a, gw, "$tunnel/gw-17/notify"));
        assert!(!sub(&a, gw, "$tunnel/gw-18/notify"));
        assert!(!sub(&a, gw, "devices/+/cmd/#"));
        assert!(!read(&a, gw, "devices/gw-17/data/x"));
        assert!(!a.check_tunnel(&gw, "gw-17", "ssh").allowed);
    }

    // -- filter algebra --------------------------------------------------------------------

    #[test]
    fn containment() {
        for (o, i) in [
            ("a/#", "a/+/b"),
            ("a/#", "a/#"),
            ("a/#", "a"),
            ("a/#", "a/b/c/d"),
            ("a/+", "a/b"),
            ("a/+", "a/+"),
            ("#", "a/#"),
            ("#", "+/+"),
            ("#", "#"),
            ("#", "+/#"),
            ("+/#", "#"),
            ("+/#", "a"),
            ("$SYS/#", "$SYS/a/+"),
            ("$SYS/#", "$SYS"),
            ("$SYS/+", "$SYS/a"),
            ("a", "a"),
            ("+/+", "/"),
            ("a//#", "a//b"),
            ("/+/#", "/#"),
            ("+/+/#", "/#"),
            ("/#", "/#"),
            ("+/#", "+/#"),
        ] {
            assert!(contains(o, i), "{o} should contain {i}");
        }
        for (o, i) in [
            ("a/+", "a/#"),
            ("a/+", "a"),
            ("a/+", "a/b/c"),
            ("a/b", "a/+"),
            ("a", "a/#"),
            ("a/b/#", "a/#"),
            ("a/b/#", "a"),
            ("#", "$SYS/#"),
            ("#", "$SYS"),
            ("+/#", "$SYS/a"),
            ("+", "$SYS"),
            ("+", "#"),
            ("+/+/#", "#"),
            ("+", "a/b"),
            ("$SYS/#", "#"),
            ("$SYS/#", "$OTHER"),
            ("a/#", "b"),
            ("a/#", "ab"),
            ("a/+/#", "a/#"),
            ("/+", "/#"),
            ("+/+/#", "+/#"),
        ] {
            assert!(!contains(o, i), "{o} should not contain {i}");
        }
    }

    #[test]
    fn intersection() {
        for (a, b) in [
            ("a/#", "a/secret/+"),
            ("#", "a"),
            ("+", "a"),
            ("a/+", "+/b"),
            ("a/#", "a"),
            ("#", "+/+/+"),
            ("$SYS/#", "$SYS/+"),
            ("$SYS/#", "$SYS"),
            ("+/#", "a/b/c"),
            ("/#", "+/+"),
            ("/#", "/#"),
            ("+/#", "+"),
        ] {
            assert!(intersect(a, b), "{a} ∩ {b}");
        }
        for (a, b) in [
            ("a/+", "a"),
            ("a/b", "a/c"),
            ("a/+/c", "a/b/d"),
            ("#", "$SYS/#"),
            ("+/+", "$SYS/x"),
            ("+", "a/b"),
            ("a/b/#", "a"),
            ("$SYS/#", "$OTHER/#"),
            ("/#", "+"),
        ] {
            assert!(!intersect(a, b), "{a} ∩ {b}");
        }
    }
}
